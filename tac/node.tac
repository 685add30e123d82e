# A ckv node (one replica), configured from the environment.
#
#   CKV_NAME=n1 twistd -n --pidfile= -y tac/node.tac
#
# Environment (defaults in brackets):
#   CKV_NAME       node name, unique in the cluster          [n1]
#   CKV_LISTEN     server endpoint        [tcp:7011:interface=127.0.0.1]
#   CKV_MASTER     client endpoint of the master     [tcp:127.0.0.1:7000]
#   CKV_DATA_DIR   LMDB directory                      [./ckv-data/$CKV_NAME]
#   CKV_ADMIN      admin console endpoint, "" for none                [none]
#   CKV_SYNC       durable | replicated                            [durable]
#   CKV_ADVERTISE  HOST:PORT others use to reach this node   [from --listen]
#   CKV_PORT_FILE  write the bound ports here as JSON                 [none]
#
# The flags and their checks are those of `twistd ckv-node` (ckv/chain/tap.py).
import os

from twisted.application import service
from twisted.python import usage

from ckv.chain import tap

name = os.environ.get("CKV_NAME", "n1")
args = [
    "--name", name,
    "--listen", os.environ.get("CKV_LISTEN", "tcp:7011:interface=127.0.0.1"),
    "--master", os.environ.get("CKV_MASTER", "tcp:127.0.0.1:7000"),
    "--data-dir", os.environ.get("CKV_DATA_DIR", f"./ckv-data/{name}"),
    "--sync", os.environ.get("CKV_SYNC", "durable"),
]
for variable, flag in [("CKV_ADMIN", "--admin"), ("CKV_ADVERTISE", "--advertise"),
                       ("CKV_PORT_FILE", "--port-file")]:
    if os.environ.get(variable):
        args += [flag, os.environ[variable]]

options = tap.Options()
try:
    options.parseOptions(args)
except usage.UsageError as e:
    raise SystemExit(f"node.tac: {e}") from None

application = service.Application("ckv-node")
tap.makeService(options).setServiceParent(application)
