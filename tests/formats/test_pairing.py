"""Pairing rules, natural sort and pair-file parsing (no framework needed)."""

from __future__ import annotations

import pytest

from convbn import ConvBNError
from convbn.formats._pairing import Unit, layer_key, naming_candidates, natural_key, pair_units, parse_pairs


def _names(pairs):
    return [(p.key, p.conv.name, p.bn.name, p.reason) for p in pairs]


def test_natural_sort_puts_conv2_before_conv10():
    names = ["conv10", "conv2", "conv1", "block2/conv1", "block10/conv1", "conv"]
    assert sorted(names, key=natural_key) == ["block2/conv1", "block10/conv1", "conv", "conv1", "conv2", "conv10"]


def test_order_pairs_a_conv_with_the_next_batchnorm_of_the_same_width():
    units = [Unit("0", "conv", 8), Unit("1", "bn", 8), Unit("3", "conv", 16), Unit("4", "bn", 8),
             Unit("fc", "conv", 4)]
    pairs, rest = pair_units(units)
    assert _names(pairs) == [("0", "0", "1", "order")]
    assert [u.name for u in rest] == ["3", "4", "fc"]


def test_order_needs_adjacency():
    # A BatchNorm after something else (a pre-activation BN) does not pair with an earlier conv.
    units = [Unit("a", "conv", 8), Unit("b", "conv", 8), Unit("c", "bn", 8)]
    pairs, rest = pair_units(units)
    assert _names(pairs) == [("b", "b", "c", "order")]
    assert [u.name for u in rest] == ["a"]


@pytest.mark.parametrize(
    ("conv", "bn", "key"),
    [
        ("block.conv", "block.bn", "block"),           # convbn's torch template
        ("block/conv", "block/bn", "block"),           # convbn's flax template
        ("conv1", "conv1/BatchNorm", "conv1"),         # tf-slim normalizer scope
        ("layer1.0.conv2", "layer1.0.bn2", "layer1.0.conv2"),  # torchvision
        ("conv2_block1_1_conv", "conv2_block1_1_bn", "conv2_block1_1_conv"),  # Keras applications
        ("Conv_3", "BatchNorm_3", "Conv_3"),           # flax.linen default names
        ("stem", "stem_bn", "stem"),                   # convbn's Keras template
    ],
)
def test_naming_conventions_beat_order(conv, bn, key):
    # Source order puts a decoy BN of the same width right after the conv; naming wins.
    units = [Unit(conv, "conv", 8), Unit("decoy", "bn", 8), Unit(bn, "bn", 8)]
    pairs, rest = pair_units(units)
    assert _names(pairs) == [(key, conv, bn, "naming")]
    assert [u.name for u in rest] == ["decoy"]
    assert bn in naming_candidates(conv)


def test_linen_indices_pair_only_when_every_conv_has_a_batchnorm():
    # linen numbers Conv and BatchNorm separately: with a stem conv without BatchNorm, Conv_1 is
    # followed by BatchNorm_0, and the index rule would pair Conv_0 with it. Order pairs them right.
    units = [Unit("params/Conv_0", "conv", 8), Unit("params/Conv_1", "conv", 8),
             Unit("params/BatchNorm_0", "bn", 8)]
    pairs, rest = pair_units(units)
    assert _names(pairs) == [("params/Conv_1", "params/Conv_1", "params/BatchNorm_0", "order")]
    assert [u.name for u in rest] == ["params/Conv_0"]
    # Balanced, the index rule still wins over a misleading order.
    units = [Unit("p/Conv_0", "conv", 8), Unit("p/BatchNorm_1", "bn", 8),
             Unit("p/Conv_1", "conv", 8), Unit("p/BatchNorm_0", "bn", 8)]
    pairs, rest = pair_units(units)
    assert sorted(_names(pairs)) == [("p/Conv_0", "p/Conv_0", "p/BatchNorm_0", "naming"),
                                     ("p/Conv_1", "p/Conv_1", "p/BatchNorm_1", "naming")]
    assert rest == []


def test_naming_requires_matching_channels():
    units = [Unit("x.conv", "conv", 8), Unit("x.bn", "bn", 4)]
    pairs, rest = pair_units(units, order=None)
    assert pairs == [] and len(rest) == 2


def test_graph_beats_naming_and_explicit_beats_graph():
    units = [Unit("a.conv", "conv", 8), Unit("a.bn", "bn", 8), Unit("other", "bn", 8), Unit("third", "bn", 8)]
    pairs, _ = pair_units(units, graph={"a.conv": "other"})
    assert _names(pairs) == [("a.conv", "a.conv", "other", "graph")]
    pairs, _ = pair_units(units, explicit={"a.conv": "third"}, graph={"a.conv": "other"})
    assert _names(pairs) == [("a.conv", "a.conv", "third", "explicit")]


def test_dcgan_names_pair_only_explicitly():
    units = [Unit("d_h1_conv", "conv", 16), Unit("d_h2_conv", "conv", 32), Unit("d_bn1", "bn", 16),
             Unit("d_bn2", "bn", 32)]
    pairs, rest = pair_units(units, order=None)
    assert pairs == [] and len(rest) == 4
    pairs, rest = pair_units(units, explicit={"d_h1_conv": "d_bn1", "d_h2_conv": "d_bn2"})
    assert _names(pairs) == [("d_h1_conv", "d_h1_conv", "d_bn1", "explicit"),
                             ("d_h2_conv", "d_h2_conv", "d_bn2", "explicit")]
    assert rest == []


def test_by_kind_pairs_within_class_order():
    # Keras .weights.h5: groups sorted by class, no interleaving recorded.
    units = [Unit("batch_normalization", "bn", 8), Unit("batch_normalization_1", "bn", 16),
             Unit("conv2d", "conv", 8), Unit("conv2d_1", "conv", 4), Unit("conv2d_2", "conv", 16)]
    pairs, rest = pair_units(units, naming=False, order="by_kind")
    assert _names(pairs) == [("conv2d", "conv2d", "batch_normalization", "order"),
                             ("conv2d_2", "conv2d_2", "batch_normalization_1", "order")]
    assert [u.name for u in rest] == ["conv2d_1"]


@pytest.mark.parametrize(
    ("explicit", "message"),
    [
        ({"nope": "b"}, "an explicit pair must name a conv in x.pt; known convs: ['a']. Received: pair nope=b"),
        ({"a": "nope"}, "an explicit pair must name a BatchNorm in x.pt; known BatchNorms: ['b', 'c']. Received: pair a=nope"),
        ({"a": "c"}, "a paired conv and BatchNorm must have the same channel count (in x.pt). Received: 'a' has 8 output channels, 'c' has 4"),
    ],
)
def test_bad_explicit_pairs_are_errors(explicit, message):
    units = [Unit("a", "conv", 8), Unit("b", "bn", 8), Unit("c", "bn", 4)]
    with pytest.raises(ConvBNError) as info:
        pair_units(units, explicit=explicit, source="x.pt")
    assert str(info.value) == message


def test_layer_key():
    assert layer_key("a.conv", "a.bn") == "a"
    assert layer_key("a.conv", "b.bn") == "a.conv"
    assert layer_key("net/0", "net/1") == "net/0"


def test_parse_pairs_from_strings_mapping_and_files(tmp_path):
    assert parse_pairs(None) == {}
    assert parse_pairs({"c": "b"}) == {"c": "b"}
    text = tmp_path / "pairs.txt"
    text.write_text("# DCGAN discriminator\nd_h1_conv = d_bn1\nd_h2_conv: d_bn2  # second\n\nd_h3_conv d_bn3\n")
    as_json = tmp_path / "pairs.json"
    as_json.write_text('{"g_h1": "g_bn1"}')
    expected = {"d_h1_conv": "d_bn1", "d_h2_conv": "d_bn2", "d_h3_conv": "d_bn3"}
    assert parse_pairs(text) == expected
    assert parse_pairs(str(text)) == expected
    assert parse_pairs(["x=y", str(as_json)]) == {"x": "y", "g_h1": "g_bn1"}


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (["a="], "a pair must be written CONV=BN with both names. Received: --pair a="),
        (["a=b", "a=c"], "each conv and BatchNorm may be paired once. Received: a=c (--pair a=c) repeats a name"),
        (["a=b", "c=b"], "each conv and BatchNorm may be paired once. Received: c=b (--pair c=b) repeats a name"),
        (["missing.txt"], "a pair must be CONV=BN or the path of a mapping file. Received: 'missing.txt' (no '=' and no such file)"),
    ],
)
def test_parse_pairs_errors(spec, message, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConvBNError) as info:
        parse_pairs(spec)
    assert str(info.value) == message


def test_pair_file_errors(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_text("only_one_name\n")
    with pytest.raises(ConvBNError, match=r"each line of a pair file must read 'conv=bn'. Received: .*bad.txt:1"):
        parse_pairs(bad)
    bad.write_text("{not json")
    with pytest.raises(ConvBNError, match="is not valid JSON"):
        parse_pairs(bad)
