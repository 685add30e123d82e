# A ckv dispatcher, configured from the environment.
#
#   twistd -n --pidfile= -y tac/dispatcher.tac
#
# Environment (defaults in brackets):
#   CKV_LISTEN     server endpoint        [tcp:7200:interface=127.0.0.1]
#   CKV_MASTER     client endpoint of the master     [tcp:127.0.0.1:7000]
#   CKV_ADMIN      admin console endpoint, "" for none                [none]
#   CKV_PORT_FILE  write the bound ports here as JSON                 [none]
#
# The flags and their checks are those of `twistd ckv-dispatcher`
# (ckv/dispatcher/tap.py).
import os

from twisted.application import service
from twisted.python import usage

from ckv.dispatcher import tap

args = [
    "--listen", os.environ.get("CKV_LISTEN", "tcp:7200:interface=127.0.0.1"),
    "--master", os.environ.get("CKV_MASTER", "tcp:127.0.0.1:7000"),
]
for variable, flag in [("CKV_ADMIN", "--admin"), ("CKV_PORT_FILE", "--port-file")]:
    if os.environ.get(variable):
        args += [flag, os.environ[variable]]

options = tap.Options()
try:
    options.parseOptions(args)
except usage.UsageError as e:
    raise SystemExit(f"dispatcher.tac: {e}") from None

application = service.Application("ckv-dispatcher")
tap.makeService(options).setServiceParent(application)
