"""
twistd plugins for ckv: C{twistd ckv-node}, C{twistd ckv-master} and
C{twistd ckv-dispatcher}.

This file is a Twisted plugin dropin.  It must stay thin: the modules named
here are imported only when their subcommand is used, and nothing here may
import the reactor (that would break C{twistd --reactor=...}).  There is no
C{__init__.py} anywhere under C{twisted/}, on purpose.
"""

from twisted.application.service import ServiceMaker

ckvNode = ServiceMaker(
    "ckv-node",
    "ckv.chain.tap",
    "A ckv replica: one member of a replication chain, storing its data in LMDB.",
    "ckv-node",
)

ckvMaster = ServiceMaker(
    "ckv-master",
    "ckv.master.tap",
    "The ckv master: chain membership, configuration, epochs and the slot map.",
    "ckv-master",
)

ckvDispatcher = ServiceMaker(
    "ckv-dispatcher",
    "ckv.dispatcher.tap",
    "The ckv dispatcher: routes client requests to the right chain's head or tail.",
    "ckv-dispatcher",
)
