"""remotefs_aa: Active-Active RemoteFS volume drivers with pluggable locks."""

import warnings

__version__ = "0.1.0"

# os-brick needs oslo.service, which installs eventlet; oslo.privsep then
# imports eventlet (only to check whether it is monkey-patched) and eventlet
# prints a deprecation banner on every CLI run. remotefs_aa never uses
# eventlet, so the banner is noise for operators.
warnings.filterwarnings("ignore", message=r"\s*Eventlet is deprecated", module="oslo_privsep")
