"""Images and snapshot chains: qemu-img wrappers, qcow2 headers, .info files."""
