"""PyTorch twins of hamjax's models and of its PGD-AT train step, for side-by-side benchmarks
(`eval_throughput.py`, `train_throughput.py`). torch is imported inside the functions, so the
benchmarks run without it (they then skip the torch columns)."""

from __future__ import annotations

NUM_CLASSES = 10


def torch_models():
    """The PyTorch twins of hamjax's SmallCNN, FashionMNISTCNN and PreActResNet18 (same layers,
    BN eps/momentum, normalisation inside forward, [0, 1] NCHW in, logits out)."""
    import torch
    from torch import nn

    def bn(c: int) -> nn.BatchNorm2d:
        return nn.BatchNorm2d(c, eps=1e-5, momentum=0.1)

    class Normalize(nn.Module):
        def __init__(self, channels: int):
            super().__init__()
            self.register_buffer("mean", torch.full((1, channels, 1, 1), 0.5))
            self.register_buffer("std", torch.full((1, channels, 1, 1), 0.25))

        def forward(self, x):
            return (x - self.mean) / self.std

    class SmallCNN(nn.Module):
        def __init__(self, channels: int = 1, num_classes: int = NUM_CLASSES):
            super().__init__()
            layers: list[nn.Module] = [Normalize(channels)]
            for i, width in enumerate((32, 64, 128)):
                layers += [nn.Conv2d(channels, width, 3, 1 if i == 0 else 2, 1, bias=False),
                           bn(width), nn.ReLU()]
                channels = width
            self.features = nn.Sequential(*layers)
            self.head = nn.Sequential(nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, num_classes))

        def forward(self, x):
            return self.head(self.features(x).mean(dim=(2, 3)))

    class FashionMNISTCNN(nn.Module):
        """Twin of hamjax's fmnist_cnn: two conv-BN-ReLU-maxpool blocks, dense 256."""

        def __init__(self, channels: int = 1, num_classes: int = NUM_CLASSES):
            super().__init__()
            layers: list[nn.Module] = [Normalize(channels)]
            for width in (32, 64):
                layers += [nn.Conv2d(channels, width, 3, 1, 1, bias=False), bn(width),
                           nn.ReLU(), nn.MaxPool2d(2)]
                channels = width
            self.features = nn.Sequential(*layers)
            self.head = nn.Sequential(nn.Flatten(), nn.Linear(7 * 7 * 64, 256), nn.ReLU(),
                                      nn.Linear(256, num_classes))

        def forward(self, x):
            return self.head(self.features(x))

    class PreActBlock(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int):
            super().__init__()
            self.bn1, self.bn2 = bn(cin), bn(cout)
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.shortcut = (nn.Conv2d(cin, cout, 1, stride, 0, bias=False)
                             if stride != 1 or cin != cout else None)

        def forward(self, x):
            out = torch.relu(self.bn1(x))
            shortcut = self.shortcut(out) if self.shortcut is not None else x
            out = self.conv1(out)
            out = self.conv2(torch.relu(self.bn2(out)))
            return out + shortcut

    class PreActResNet18(nn.Module):
        def __init__(self, num_classes: int = NUM_CLASSES):
            super().__init__()
            self.norm = Normalize(3)
            self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
            blocks, cin = [], 64
            for i, width in enumerate((64, 128, 256, 512)):
                for j in range(2):
                    blocks.append(PreActBlock(cin, width, 2 if (i > 0 and j == 0) else 1))
                    cin = width
            self.blocks = nn.Sequential(*blocks)
            self.bn = bn(512)
            self.linear = nn.Linear(512, num_classes)

        def forward(self, x):
            out = self.blocks(self.conv1(self.norm(x)))
            return self.linear(torch.relu(self.bn(out)).mean(dim=(2, 3)))

    return {"small_cnn": SmallCNN, "fmnist_cnn": FashionMNISTCNN,
            "preact_resnet18": PreActResNet18}


def make_torch_pgd_at_step(net, *, eps: float, step_size: float, steps: int, lr: float,
                           momentum: float, weight_decay: float, compile_mode: str | None = None,
                           autocast_dtype: str | None = None):
    """A PyTorch PGD-AT step as the usual research scripts write it (and as hamjax's `pgd_at`
    runs it): L_inf PGD-K with a uniform random start, BN in eval mode while attacking, then one
    SGD(momentum, weight decay) update on the adversarial batch in train mode. Eager by default;
    compile_mode ("default", "reduce-overhead", "max-autotune") runs the network through
    `torch.compile(net, mode=...)`, as a user who compiles would: forward and backward are
    compiled (AOTAutograd), one graph for each BN mode; the PGD loop and the optimizer stay in
    Python. autocast_dtype ("bfloat16"): forwards and backwards under `torch.autocast`, weights
    and optimiser in float32 (the mixed precision of hamjax's `model.dtype`). Returns
    step(x, y) -> loss (float)."""
    import contextlib

    import torch
    import torch.nn.functional as F

    def precision():
        if autocast_dtype in (None, "float32"):
            return contextlib.nullcontext()
        device = next(net.parameters()).device.type
        return torch.autocast(device, dtype=getattr(torch, autocast_dtype))

    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    module = net
    if compile_mode:
        net = torch.compile(module, mode=compile_mode)

    def attack(x, y):
        module.eval()
        x_adv = (x + torch.empty_like(x).uniform_(-eps, eps)).clamp(0, 1)
        for _ in range(steps):
            x_adv.requires_grad_(True)
            with precision():
                loss = F.cross_entropy(net(x_adv).float(), y)
            (grad,) = torch.autograd.grad(loss, x_adv)
            x_adv = x_adv.detach() + step_size * grad.sign()
            x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0, 1)
        return x_adv.detach()

    def step(x, y) -> float:
        x_adv = attack(x, y)
        module.train()
        opt.zero_grad(set_to_none=True)
        with precision():
            loss = F.cross_entropy(net(x_adv).float(), y)
        loss.backward()
        opt.step()
        return float(loss)

    return step


def _put(tensor, value) -> None:
    """Copies a hamjax array into a torch parameter or buffer in place."""
    import numpy as np
    import torch

    tensor.data.copy_(torch.from_numpy(np.array(value, np.float32, order="C")))  # writable


def _load_conv_bn_features(net, variables, mean, std, blocks: int, block_size: int) -> None:
    """The twin's `features`: Normalize with the run's mean and std, then `blocks` blocks of
    `block_size` layers each starting conv, BN (hamjax's conv{i}/bn{i}; kernels HWIO -> OIHW,
    BN scale, bias and running statistics)."""
    import numpy as np

    params, stats = variables["params"], variables["batch_stats"]
    norm = net.features[0]
    _put(norm.mean, np.reshape(mean, (1, -1, 1, 1)))
    _put(norm.std, np.reshape(std, (1, -1, 1, 1)))
    for i in range(blocks):
        conv, bn = net.features[1 + block_size * i], net.features[2 + block_size * i]
        _put(conv.weight, np.transpose(params[f"conv{i + 1}"]["kernel"], (3, 2, 0, 1)))
        _put(bn.weight, params[f"bn{i + 1}"]["scale"])
        _put(bn.bias, params[f"bn{i + 1}"]["bias"])
        _put(bn.running_mean, stats[f"bn{i + 1}"]["mean"])
        _put(bn.running_var, stats[f"bn{i + 1}"]["var"])


def _put_dense(layer, params, kernel=None) -> None:
    """A hamjax Dense (kernel (in, out)) into a torch Linear (weight (out, in))."""
    import numpy as np

    _put(layer.weight, np.transpose(params["kernel"] if kernel is None else kernel))
    _put(layer.bias, params["bias"])


def load_small_cnn_weights(net, variables, mean, std) -> None:
    """Copies a trained hamjax SmallCNN (params and BN running statistics) into its torch twin,
    with the run's normalisation: conv kernels HWIO -> OIHW, dense (in, out) -> (out, in)."""
    _load_conv_bn_features(net, variables, mean, std, blocks=3, block_size=3)  # conv, bn, relu
    params = variables["params"]
    _put_dense(net.head[0], params["dense"])
    _put_dense(net.head[2], params["fc"])


def load_fmnist_cnn_weights(net, variables, mean, std) -> None:
    """Copies a trained hamjax FashionMNISTCNN into its torch twin, as `load_small_cnn_weights`
    does; the first dense layer's rows are reordered from hamjax's NHWC flatten (h, w, c) to
    torch's NCHW flatten (c, h, w)."""
    import numpy as np

    # features: conv, bn, relu, maxpool per block
    _load_conv_bn_features(net, variables, mean, std, blocks=2, block_size=4)
    params = variables["params"]
    dense = np.asarray(params["dense"]["kernel"])  # (h * w * c, hidden), rows in NHWC order
    channels = np.asarray(params["conv2"]["kernel"]).shape[-1]
    side = int(round((dense.shape[0] // channels) ** 0.5))
    dense = dense.reshape(side, side, channels, -1).transpose(2, 0, 1, 3).reshape(dense.shape)
    _put_dense(net.head[1], params["dense"], kernel=dense)
    _put_dense(net.head[3], params["fc"])


# A trained hamjax model's weights into its twin, per model name.
WEIGHT_LOADERS = {"small_cnn": load_small_cnn_weights, "fmnist_cnn": load_fmnist_cnn_weights}
