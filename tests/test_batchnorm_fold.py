"""fuse-norms folds eval-mode BatchNorm into the preceding convolution, exactly."""

from __future__ import annotations

import torch

import qgraph


class ConvNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.b1 = torch.nn.BatchNorm2d(8)
        self.c2 = torch.nn.Conv2d(8, 4, 3, bias=False)
        self.b2 = torch.nn.BatchNorm2d(4)

    def forward(self, x):
        return self.b2(self.c2(torch.relu(self.b1(self.c1(x)))))


def test_batchnorm_folds_into_conv_exactly():
    torch.manual_seed(0)
    net = ConvNet()
    with torch.no_grad():
        for bn in (net.b1, net.b2):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 2.0)
            bn.bias.uniform_(-1, 1)
    net.eval()
    x = torch.randn(2, 3, 16, 16)
    model = qgraph.from_module(net, (x,))
    qgraph.run_pipeline(model, "fuse-norms", verify_each=True)
    targets = [n.target for n in model.gm.graph.nodes if n.op == "call_function"]
    assert torch.ops.aten.batch_norm.default not in targets
    assert model.log[0].summary["batchnorm_folded"] == 2
    with torch.no_grad():
        ref = net(x)
        # reference computed independently: conv → (x - μ)/√(σ²+ε)·γ + β by hand
        h = torch.nn.functional.conv2d(x, net.c1.weight, net.c1.bias, padding=1)
        h = (h - net.b1.running_mean[:, None, None]) / torch.sqrt(
            net.b1.running_var[:, None, None] + net.b1.eps
        ) * net.b1.weight[:, None, None] + net.b1.bias[:, None, None]
        h = torch.nn.functional.conv2d(torch.relu(h), net.c2.weight)
        h = (h - net.b2.running_mean[:, None, None]) / torch.sqrt(
            net.b2.running_var[:, None, None] + net.b2.eps
        ) * net.b2.weight[:, None, None] + net.b2.bias[:, None, None]
        assert torch.allclose(h, ref, atol=1e-5)
        assert float((model(x) - h).abs().max() / h.abs().max()) < 1e-5
