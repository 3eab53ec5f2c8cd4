"""convbn.load_into with tf_keras (Keras 2) models, through the same path as Keras 3 models.

tf_keras models used to be refused ("model must be a torch.nn.Module, a Keras 3 model ..."); they
are what transformers' TF models and TF-era code build. Values are compared: the loaded model's
eval outputs against the source's (torch, or the tf_keras model that wrote the file).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import convbn
from convbn.cli import main
from convbn.loading import LoadError
from tests._support import nets
from tests._support.assertions import rel_err
from tests.conftest import need

need("torch", "tf_keras", "h5py")  # tests/conftest.py has imported torch, before TensorFlow
import tf_keras  # noqa: E402
import torch  # noqa: E402

layers = tf_keras.layers
# float32 torch vs float32 TF, relative to max|y| (SEMANTICS.md section 4: within 3.2e-5 absolute
# at |y| ~ 5); a wrong layer, layout or eps gives 1e-3 to 1.
TOL = 1e-5


# The torch net (tests/_support/nets.py): a strided conv with a bias, a depthwise conv, a 1x1 conv
# with a bias, each followed by a BatchNorm with trained-looking statistics; its tf_keras twin's
# 1x1 conv has no bias (folded).


def _torch_net() -> Any:
    return nets.torch_stem_dw_pw((True, False, True))


def _tf_keras_twin(width: int = 16) -> Any:
    return nets.keras_stem_dw_pw(tf_keras, ("stem", "dw", "project"), (True, False, False), eps=1e-5, width=width)


def _weights(model: Any) -> list[np.ndarray]:
    return [np.array(w) for w in model.get_weights()]


def test_a_torch_checkpoint_loads_into_a_tf_keras_model(tmp_path):
    net = _torch_net()
    torch.save(net.state_dict(), tmp_path / "m.pt")
    model = _tf_keras_twin()
    report = convbn.load_into(model, tmp_path / "m.pt")
    assert report.ok and report.loaded and report.pairing == "layer graph"
    assert report.matched == {"stem": "0", "dw": "3", "project": "6"}
    assert report.folded == {"project": "beta"}
    x = np.random.default_rng(0).standard_normal((2, 3, 9, 9)).astype("f4")
    with torch.no_grad():
        expected = net(torch.from_numpy(x)).numpy().transpose(0, 2, 3, 1)
    assert rel_err(model(x.transpose(0, 2, 3, 1), training=False).numpy(), expected) < TOL


def _tiny_resnet() -> Any:
    """keras.applications' ResNet blocks: each block lists its shortcut conv before the main
    branch's last conv, and both before their BatchNorms."""
    from tf_keras.src.applications import resnet

    def stacks(x: Any) -> Any:
        x = resnet.stack1(x, 8, 2, stride1=1, name="conv2")
        return resnet.stack1(x, 16, 1, name="conv3")

    return resnet.ResNet(stacks, False, True, "tiny", include_top=False, weights=None, input_shape=(32, 32, 3))


def test_a_keras_applications_resnet_loads_from_its_own_h5_and_from_torch(tmp_path):
    """Its own Keras 2 file, and the torch file converted from it, load into a fresh model by the
    graph's order and shapes, to the same outputs bit for bit (the values pass through unchanged)."""
    rng = np.random.default_rng(0)
    model = _tiny_resnet()
    for layer in model.layers:
        values = [rng.standard_normal(w.shape).astype("f4") * 0.3 for w in layer.get_weights()]
        if isinstance(layer, layers.BatchNormalization):
            values[-1] = rng.uniform(0.5, 1.5, values[-1].shape).astype("f4")
        layer.set_weights(values)
    model.save_weights(tmp_path / "w.h5")
    assert main(["convert", str(tmp_path / "w.h5"), str(tmp_path / "m.pt")]) == 0
    x = rng.standard_normal((2, 32, 32, 3)).astype("f4")
    expected = model(x, training=False).numpy()
    for source in ("w.h5", "m.pt"):
        fresh = _tiny_resnet()
        report = convbn.load_into(fresh, tmp_path / source)
        assert report.ok and len(report.matched) == 12 and not report.folded, source
        assert report.matched["conv2_block1_0_conv"] == "conv2_block1_0_conv", source
        assert np.array_equal(fresh(x, training=False).numpy(), expected), source


def test_a_shape_mismatch_changes_nothing(tmp_path):
    torch.save(_torch_net().state_dict(), tmp_path / "m.pt")
    model = _tf_keras_twin(width=12)
    before = _weights(model)
    with pytest.raises(LoadError) as info:
        convbn.load_into(model, tmp_path / "m.pt")
    assert [m.model for m in info.value.report.mismatched] == ["project"]
    assert all(np.array_equal(a, b) for a, b in zip(before, _weights(model), strict=True))


def test_a_conv_with_an_activation_is_no_pair(tmp_path):
    torch.save(_torch_net()[:2].state_dict(), tmp_path / "m.pt")
    inp = tf_keras.Input((9, 9, 3))
    x = layers.Conv2D(8, 3, strides=2, activation="relu", name="stem")(layers.ZeroPadding2D(1)(inp))
    model = tf_keras.Model(inp, layers.BatchNormalization(name="stem_bn")(x))
    report = convbn.load_into(model, tmp_path / "m.pt", strict=False)
    assert report.matched == {} and report.unexpected == ["0"]
    assert any("stem + stem_bn left as they are" in n and "'relu'" in n for n in report.notes)


def test_a_failing_write_restores_every_pair(tmp_path, monkeypatch):
    """All or nothing: the second pair's write fails after the first's was made; both are back."""
    from convbn.loading import _keras

    torch.save(_torch_net().state_dict(), tmp_path / "m.pt")
    model = _tf_keras_twin()
    before = _weights(model)
    written = []
    assign = _keras.assign_keras

    def fail_second(conv: Any, bn: Any, params: Any) -> None:
        if written:
            raise RuntimeError("disk on fire")
        assign(conv, bn, params)
        written.append(conv.name)

    monkeypatch.setattr(_keras, "assign_keras", fail_second)
    with pytest.raises(RuntimeError, match="disk on fire"):
        convbn.load_into(model, tmp_path / "m.pt")
    assert written == ["stem"]
    assert all(np.array_equal(a, b) for a, b in zip(before, _weights(model), strict=True))
    assert model.get_layer("stem_bn").epsilon == 1e-5


def test_model_kind_names_tf_keras_models_keras():
    from convbn.loading import model_kind

    assert model_kind(_tf_keras_twin()) == "keras"
    with pytest.raises(TypeError, match=r"a Keras 3 model or layer \(or a tf_keras one\)"):
        model_kind(object())


# -- an HF-style ResNet (transformers' TFResNetModel pattern; transformers is not installed) ------------


class _HFConv(layers.Layer):
    """transformers' TFResNetConvLayer: pad, conv without bias, BatchNorm(eps 1e-5, momentum 0.9)."""

    def __init__(self, out: int, k: int = 3, stride: int = 1, act: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.pad = layers.ZeroPadding2D(k // 2)
        self.convolution = layers.Conv2D(out, k, strides=stride, use_bias=False, name="convolution")
        self.normalization = layers.BatchNormalization(epsilon=1e-5, momentum=0.9, name="normalization")
        self.act = act

    def call(self, x: Any, training: bool = False) -> Any:
        y = self.normalization(self.convolution(self.pad(x)), training=training)
        return tf_keras.activations.relu(y) if self.act else y


class _HFBasic(layers.Layer):
    """TFResNetBasicLayer: a 1x1 shortcut conv + BatchNorm where the shape changes, two convs."""

    def __init__(self, cin: int, out: int, stride: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.shortcut = _HFConv(out, 1, stride, act=False, name="shortcut") if cin != out or stride != 1 else None
        self.layer = [_HFConv(out, stride=stride, name="layer.0"), _HFConv(out, act=False, name="layer.1")]

    def call(self, x: Any, training: bool = False) -> Any:
        residual = x if self.shortcut is None else self.shortcut(x, training=training)
        for layer in self.layer:
            x = layer(x, training=training)
        return tf_keras.activations.relu(x + residual)


class _HFResNet(tf_keras.Model):
    """A subclassed model with one main layer holding every weight, as TFResNetModel's ``resnet``:
    no layer graph, and its .h5 lists one layer whose weight names carry the nested scopes."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.resnet = _HFMain(name="resnet")

    def call(self, x: Any, training: bool = False) -> Any:
        return self.resnet(x, training=training)


class _HFMain(layers.Layer):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.embedder = _HFConv(8, 3, 2, name="embedder")
        self.stages = [_HFBasic(8, 16, 2, name="stages.0.layers.0"), _HFBasic(16, 16, 1, name="stages.0.layers.1")]

    def call(self, x: Any, training: bool = False) -> Any:
        x = self.embedder(x, training=training)
        for stage in self.stages:
            x = stage(x, training=training)
        return x


def _hf_torch() -> Any:
    """The same network in torch (transformers' ResNetModel pattern), trained-looking statistics."""
    nn = torch.nn

    class Conv(nn.Module):
        def __init__(self, cin: int, out: int, k: int = 3, stride: int = 1, act: bool = True) -> None:
            super().__init__()
            self.convolution = nn.Conv2d(cin, out, k, stride=stride, padding=k // 2, bias=False)
            self.normalization = nn.BatchNorm2d(out)
            self.act = act

        def forward(self, x: Any) -> Any:
            y = self.normalization(self.convolution(x))
            return torch.relu(y) if self.act else y

    class Basic(nn.Module):
        def __init__(self, cin: int, out: int, stride: int) -> None:
            super().__init__()
            self.shortcut = Conv(cin, out, 1, stride, act=False) if cin != out or stride != 1 else nn.Identity()
            self.layer = nn.Sequential(Conv(cin, out, stride=stride), Conv(out, out, act=False))

        def forward(self, x: Any) -> Any:
            return torch.relu(self.layer(x) + self.shortcut(x))

    torch.manual_seed(1)
    net = nn.Sequential(Conv(3, 8, 3, 2), Basic(8, 16, 2), Basic(16, 16, 1))
    for module in net.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.normal_()
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.normal_()
            module.bias.data.normal_()
    return net.eval()


def test_an_hf_style_torch_resnet_loads_into_its_tf_keras_port(tmp_path):
    """PyTorch -> a subclassed tf_keras model (no layer graph: pairs by layer order) reproduces the
    last hidden state."""
    net = _hf_torch()
    torch.save(net.state_dict(), tmp_path / "resnet.pt")
    model = _HFResNet()
    x = np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype("f4")
    model(x.transpose(0, 2, 3, 1))
    report = convbn.load_into(model, tmp_path / "resnet.pt")
    assert report.ok and report.pairing == "layer order" and len(report.matched) == 6
    assert report.pairs["resnet/stages.0.layers.0/shortcut/convolution"] == "resnet/stages.0.layers.0/shortcut/normalization"
    with torch.no_grad():
        expected = net(torch.from_numpy(x)).numpy().transpose(0, 2, 3, 1)
    assert rel_err(model(x.transpose(0, 2, 3, 1), training=False).numpy(), expected) < TOL


def test_an_hf_style_tf_keras_h5_reads_by_scope_and_writes_back(tmp_path):
    """Its save_weights .h5 lists one layer, ``resnet``, whose weight names carry each conv's and
    BatchNorm's scope (moving statistics last): read as one pair per scope, written back as the
    same file, which the model loads to the same outputs."""
    model = _HFResNet()
    x = np.random.default_rng(0).standard_normal((2, 16, 16, 3)).astype("f4")
    model(x)
    rng = np.random.default_rng(2)
    model.set_weights([rng.uniform(0.5, 1.5, w.shape).astype("f4") for w in model.get_weights()])
    model.save_weights(tmp_path / "tf_model.h5")
    ckpt = convbn.load_checkpoint(tmp_path / "tf_model.h5")
    assert [s.conv_name.rsplit("/", 2)[-2] for s in ckpt.sources.values()] == [
        "embedder", "shortcut", "layer.0", "layer.1", "layer.0", "layer.1"]
    assert all(s.bn_name == s.conv_name.replace("convolution", "normalization") for s in ckpt.sources.values())
    key, first = next(iter(ckpt.layers.items()))
    assert key.endswith("/resnet/embedder/convolution"), key
    np.testing.assert_array_equal(first.moving_var, model.resnet.embedder.normalization.moving_variance.numpy())
    assert main(["convert", str(tmp_path / "tf_model.h5"), str(tmp_path / "back.h5")]) == 0
    fresh = _HFResNet()
    fresh(x)
    fresh.load_weights(tmp_path / "back.h5")
    assert np.array_equal(fresh(x, training=False).numpy(), model(x, training=False).numpy())
