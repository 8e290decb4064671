"""Trace your own module, write a pass, and run it with verification.

.venv/bin/python examples/custom_pass.py
"""

import torch

import qgraph
from qgraph.graph_edits import finish, get_tensor, set_arg_tensor


class TinyMLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up = torch.nn.Linear(64, 128)
        self.down = torch.nn.Linear(128, 64)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


@qgraph.register
class ScaleHidden(qgraph.Pass):
    """Scale the hidden units by a positive factor and undo it in the next layer (exact:
    relu commutes with positive scaling)."""

    name = "scale-hidden"
    help = "Multiply up-projection rows by `factor` and divide down-projection columns by it."
    options = (qgraph.Option("factor", float, 2.0, "positive scale"),)
    exact = True

    def run(self, model):
        up, down = model.structure.linears
        f = self.opt("factor")
        set_arg_tensor(model.gm, up.node, 1, get_tensor(model.gm, up.weight) * f, "up.weight")
        set_arg_tensor(model.gm, up.node, 2, get_tensor(model.gm, up.bias) * f, "up.bias")
        set_arg_tensor(model.gm, down.node, 1, get_tensor(model.gm, down.weight) / f, "down.weight")
        finish(model.gm)
        return {"factor": f}


module = TinyMLP().eval()
x = torch.randn(4, 64)
model = qgraph.from_module(module, (x,))
qgraph.run_pipeline(
    model,
    "scale-hidden{factor=3.0},quantize{w=int8:channel,exclude=}",
    verify_each=True,
    print_after=True,
)
with torch.no_grad():
    print("max |Δ| after W8 quantization:", float((model(x) - module(x)).abs().max()))
