# The ckv master, configured from the environment.
#
#   twistd -n --pidfile= -y tac/master.tac
#
# Environment (defaults in brackets):
#   CKV_LISTEN              server endpoint  [tcp:7000:interface=127.0.0.1]
#   CKV_DATA_DIR            LMDB directory                [./ckv-data/master]
#   CKV_ADMIN               admin console endpoint, "" for none          [none]
#   CKV_CHAINS              number of chains                                [1]
#   CKV_CHAIN_LENGTH        members per chain                               [3]
#   CKV_HEARTBEAT_INTERVAL  seconds between heartbeats                      [1]
#   CKV_FAILURE_TIMEOUT     seconds of silence before a node is failed      [5]
#   CKV_PORT_FILE           write the bound ports here as JSON           [none]
#
# The flags and their checks are those of `twistd ckv-master` (ckv/master/tap.py).
import os

from twisted.application import service
from twisted.python import usage

from ckv.master import tap

args = [
    "--listen", os.environ.get("CKV_LISTEN", "tcp:7000:interface=127.0.0.1"),
    "--data-dir", os.environ.get("CKV_DATA_DIR", "./ckv-data/master"),
]
for variable, flag in [
    ("CKV_ADMIN", "--admin"),
    ("CKV_CHAINS", "--chains"),
    ("CKV_CHAIN_LENGTH", "--chain-length"),
    ("CKV_HEARTBEAT_INTERVAL", "--heartbeat-interval"),
    ("CKV_FAILURE_TIMEOUT", "--failure-timeout"),
    ("CKV_PORT_FILE", "--port-file"),
]:
    if os.environ.get(variable):
        args += [flag, os.environ[variable]]

options = tap.Options()
try:
    options.parseOptions(args)
except usage.UsageError as e:
    raise SystemExit(f"master.tac: {e}") from None

application = service.Application("ckv-master")
tap.makeService(options).setServiceParent(application)
