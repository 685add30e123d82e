# A whole ckv cluster in ONE process: a master, 3 nodes and a dispatcher.
# Handy for experiments and debugging (one log, one debugger); `ckv local`
# runs the same layout as separate processes, which is closer to production.
#
#   twistd -n --pidfile= -y tac/local-cluster.tac
#
# Environment (defaults in brackets):
#   CKV_TAC_DATA_DIR   data directory                     [./ckv-data-tac]
#   CKV_TAC_BASE_PORT  first port B of the layout below             [7000]
#   CKV_TAC_NODES      number of nodes (1-9)                           [3]
#   CKV_TAC_SYNC       durable | replicated                      [durable]
#
# Ports (all on 127.0.0.1), as in `ckv local`:
#   master      B        admin B+1
#   node i      B+10+i   admin B+20+i
#   dispatcher  B+200    admin B+201
# Then: ckv put greeting hello; ckv get greeting; ckv status
# (with another B: CKV_CONNECT=tcp:127.0.0.1:<B+200> CKV_MASTER=tcp:127.0.0.1:<B>).
import os

from twisted.application import service
from twisted.python import usage

from ckv.chain import tap as node_tap
from ckv.dispatcher import tap as dispatcher_tap
from ckv.master import tap as master_tap

data_dir = os.environ.get("CKV_TAC_DATA_DIR", "./ckv-data-tac")
base = int(os.environ.get("CKV_TAC_BASE_PORT", "7000"))
nodes = int(os.environ.get("CKV_TAC_NODES", "3"))
sync = os.environ.get("CKV_TAC_SYNC", "durable")
master = f"tcp:127.0.0.1:{base}"


def listen(offset):
    return f"tcp:{base + offset}:interface=127.0.0.1"


def build(tap, args):
    options = tap.Options()
    try:
        options.parseOptions(args)
    except usage.UsageError as e:
        raise SystemExit(f"local-cluster.tac: {e}") from None
    return tap.makeService(options)


application = service.Application("ckv-local-cluster")

build(master_tap, [
    "--listen", listen(0), "--admin", listen(1),
    "--data-dir", os.path.join(data_dir, "master"),
    "--chain-length", str(nodes),
]).setServiceParent(application)

for i in range(1, nodes + 1):
    build(node_tap, [
        "--name", f"n{i}", "--listen", listen(10 + i), "--admin", listen(20 + i),
        "--master", master, "--data-dir", os.path.join(data_dir, f"n{i}"), "--sync", sync,
    ]).setServiceParent(application)

build(dispatcher_tap, [
    "--listen", listen(200), "--admin", listen(201), "--master", master,
]).setServiceParent(application)
