"""remotefs_aa: Active-Active RemoteFS volume drivers with pluggable locks."""

__version__ = "0.1.0"
