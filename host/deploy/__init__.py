"""Deploy a trained network to the macro and benchmark it there.

- ``schedule``: where each tile of ``cimlab.mapping`` sits on the macro and in which load of it (numpy);
- ``package``: the deployment package, one ``.npz`` with a JSON manifest, no pickle (numpy);
- ``program``: program a page, verify it by read-back, rewrite what differs, switch pages (numpy);
- ``compile``: checkpoint -> package (imports torch);
- ``runner``: the network with its MACs on the chip, and on the host at the package's placement (imports torch);
- ``bench``: accuracy on the chip against the host's prediction, throughput against its bounds (imports torch).

This package imports nothing itself: ``cimlab info`` and ``cimlab deploy`` never load torch.
"""
