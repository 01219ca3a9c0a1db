"""Bundles: the manifest against its JSON Schema, versioning, and everything the loader refuses."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
from pathlib import Path

import jsonschema
import numpy as np
import onnx
import pytest

import vaeinfer
from vaeinfer import BundleError
from vaeinfer import manifest as manifest_mod
from vaeinfer.kinds.vae import vae_graphs

SCHEMA_PATH = Path(vaeinfer.__file__).parent / "manifest.schema.json"


@pytest.fixture(scope="module")
def validator():
    schema = json.loads(SCHEMA_PATH.read_text())
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def _read(bundle: Path) -> dict:
    return json.loads((bundle / "manifest.json").read_text())


def _write(bundle: Path, manifest: dict) -> None:
    (bundle / "manifest.json").write_text(json.dumps(manifest, indent=2))


def _resign(bundle: Path) -> None:
    """Recompute the manifest's sha256 of every graph (what an attacker or a careless tool would do)."""
    manifest = _read(bundle)
    for entry in manifest["graphs"].values():
        entry["sha256"] = hashlib.sha256((bundle / entry["file"]).read_bytes()).hexdigest()
    _write(bundle, manifest)


# ---- schema ---------------------------------------------------------------------------------------------


def test_exported_manifests_match_schema(trained, validator):
    validator.validate(_read(trained.bundle))


def test_gaussian_and_user_manifests_match_schema(zoo, validator):
    validator.validate(_read(zoo.get("mlp-gauss").bundle))


@pytest.mark.parametrize("name", vaeinfer.available_models())
def test_bundled_models(name, validator):
    bundle = vaeinfer.bundle.locate(name)
    manifest = _read(bundle)
    validator.validate(manifest)
    manifest_mod.parse(manifest)
    for entry in manifest["graphs"].values():
        model = onnx.load(str(bundle / entry["file"]), load_external_data=False)
        assert model.ir_version <= 10
        assert any(p.key.startswith("vaeinfer.") for p in model.metadata_props)
        assert not any(n.op_type.startswith("Random") for n in model.graph.node)
    vae = vaeinfer.load(name, device="cpu", threads=1)
    assert vae.sample(2, seed=0).shape == (2, *vae.info.image_shape)


def _mutations():
    """(id, change, valid): the same verdict is expected from vaeinfer.manifest.parse and the schema."""

    def setter(path, value):
        def change(m):
            *parents, last = path
            target = m
            for key in parents:
                target = target[key]
            target[last] = value
        return change

    def deleter(path):
        def change(m):
            *parents, last = path
            target = m
            for key in parents:
                target = target[key]
            del target[last]
        return change

    yield "as-exported", lambda m: None, True
    yield "newer-minor", setter(["format_version"], "1.9"), True
    yield "newer-minor-fields", lambda m: m.update(format_version="1.3", future={"x": 1}), True
    yield "unknown-major", setter(["format_version"], "2.0"), False
    yield "major-zero", setter(["format_version"], "0.9"), False
    yield "no-minor", setter(["format_version"], "1"), False
    yield "wrong-format", setter(["format"], "other-bundle"), False
    yield "kind", setter(["kind"], "gan"), False
    yield "channels-2", setter(["image", "channels"], 2), False
    yield "height-0", setter(["image", "height"], 0), False
    yield "width-huge", setter(["image", "width"], 5000), False
    yield "width-string", setter(["image", "width"], "12"), False
    yield "no-range", deleter(["image", "range"]), False
    yield "latent-0", setter(["latent", "dim"], 0), False
    yield "likelihood", setter(["likelihood", "kind"], "poisson"), False
    yield "gaussian-no-scale", setter(["likelihood"], {"kind": "gaussian"}), False
    yield "gaussian-zero-scale", setter(["likelihood"], {"kind": "gaussian", "scale": 0}), False
    yield "no-decoder", deleter(["graphs", "decoder"]), False
    yield "extra-graph", lambda m: m["graphs"].update(extra=copy.deepcopy(m["graphs"]["decoder"])), False
    yield "sha-upper", lambda m: m["graphs"]["encoder"].update(sha256=m["graphs"]["encoder"]["sha256"].upper()), False
    yield "sha-short", setter(["graphs", "encoder", "sha256"], "abc"), False
    yield "file-slash", setter(["graphs", "encoder", "file"], "sub/encoder.onnx"), False
    yield "file-dotdot", setter(["graphs", "encoder", "file"], "../encoder.onnx"), False
    yield "file-absolute", setter(["graphs", "encoder", "file"], "/tmp/encoder.onnx"), False
    yield "file-backslash", setter(["graphs", "encoder", "file"], "..\\encoder.onnx"), False
    yield "file-not-onnx", setter(["graphs", "encoder", "file"], "encoder.bin"), False
    yield "variant-fp16", lambda m: m.update(variants={"fp16": {"graphs": {"decoder": {
        "file": "decoder.fp16.onnx", "sha256": "0" * 64}}}}), True
    yield "variant-fp8", lambda m: m.update(variants={"fp8": {"graphs": {"decoder": {
        "file": "decoder.fp8.onnx", "sha256": "0" * 64}}}}), False
    yield "variant-empty", lambda m: m.update(variants={"fp16": {"graphs": {}}}), False


@pytest.mark.parametrize("label,change,valid", list(_mutations()), ids=[m[0] for m in _mutations()])
def test_parser_and_schema_agree(mlp, validator, label, change, valid):
    manifest = _read(mlp.bundle)
    change(manifest)
    schema_ok = validator.is_valid(manifest)
    try:
        manifest_mod.parse(manifest)
        parser_ok = True
    except BundleError:
        parser_ok = False
    assert (parser_ok, schema_ok) == (valid, valid)


@pytest.mark.parametrize("change", [
    lambda m: m.update(prior={"num_classes": 0}),  # a prior on a plain VAE
    lambda m: m["image"].update(range=[1.0, 0.0]),  # low >= high
    lambda m: m["graphs"]["decoder"]["inputs"][0].update(name="latent"),  # I/O that the facts do not imply
], ids=["prior-on-vae", "empty-range", "io-vs-facts"])
def test_parser_only_checks(mlp, change):
    """What the schema cannot express, the parser still refuses."""
    manifest = _read(mlp.bundle)
    change(manifest)
    with pytest.raises(BundleError):
        manifest_mod.parse(manifest)


# ---- versions -------------------------------------------------------------------------------------------


def test_unknown_major_refused(bundle_copy):
    manifest = _read(bundle_copy)
    manifest["format_version"] = "2.0"
    _write(bundle_copy, manifest)
    with pytest.raises(BundleError, match="major 2"):
        vaeinfer.load(bundle_copy)


def test_newer_minor_read(bundle_copy, mlp):
    manifest = _read(bundle_copy)
    manifest["format_version"] = "1.42"
    manifest["something_new"] = {"added": "in 1.42"}
    manifest["graphs"]["decoder"]["new_field"] = 1
    _write(bundle_copy, manifest)
    vae = vaeinfer.load(bundle_copy, device="cpu")
    assert vae.info.format_version == "1.42"
    np.testing.assert_array_equal(vae.sample(3, seed=0), vaeinfer.load(mlp.bundle, device="cpu").sample(3, seed=0))


# ---- what the loader refuses ----------------------------------------------------------------------------


def test_tampered_graph_fails_sha256(bundle_copy):
    path = bundle_copy / "decoder.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="sha256"):
        vaeinfer.load(bundle_copy)


def test_symlinked_graph_refused(bundle_copy, tmp_path):
    outside = tmp_path / "elsewhere.onnx"
    shutil.move(bundle_copy / "encoder.onnx", outside)
    os.symlink(outside, bundle_copy / "encoder.onnx")  # same bytes, same sha256: only the link is wrong
    with pytest.raises(BundleError, match="symbolic link"):
        vaeinfer.load(bundle_copy)
    with pytest.raises(BundleError, match="symbolic link"):
        vaeinfer.load(bundle_copy, verify=False)


def test_symlinked_bundle_dir_refused(mlp, tmp_path):
    link = tmp_path / "link"
    os.symlink(mlp.bundle, link)
    with pytest.raises(BundleError, match="symbolic link"):
        vaeinfer.load(link)


def test_symlinked_manifest_refused(bundle_copy, tmp_path):
    shutil.move(bundle_copy / "manifest.json", tmp_path / "m.json")
    os.symlink(tmp_path / "m.json", bundle_copy / "manifest.json")
    with pytest.raises(BundleError, match="symbolic link"):
        vaeinfer.load(bundle_copy)


@pytest.mark.parametrize("name", ["sub/encoder.onnx", "../outside/encoder.onnx", "{abs}"])
def test_file_names_leaving_the_bundle_refused(bundle_copy, tmp_path, name):
    """Even with the file really there and its sha256 right."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (bundle_copy / "sub").mkdir()
    for folder in (outside, bundle_copy / "sub"):
        shutil.copy(bundle_copy / "encoder.onnx", folder / "encoder.onnx")
    name = name.replace("{abs}", str(outside / "encoder.onnx"))
    manifest = _read(bundle_copy)
    manifest["graphs"]["encoder"]["file"] = name
    _write(bundle_copy, manifest)
    with pytest.raises(BundleError, match="file name"):
        vaeinfer.load(bundle_copy)


def test_missing_files_refused(bundle_copy, tmp_path):
    (bundle_copy / "decoder.onnx").unlink()
    with pytest.raises(BundleError, match="decoder.onnx"):
        vaeinfer.load(bundle_copy)
    (bundle_copy / "manifest.json").unlink()
    with pytest.raises(BundleError, match="manifest.json"):
        vaeinfer.load(bundle_copy)
    with pytest.raises(BundleError, match="mnist-vae"):  # names the bundled models
        vaeinfer.load(tmp_path / "no-such-bundle")
    with pytest.raises(BundleError, match="no bundle"):
        vaeinfer.load("no-such-model")


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", "\xff\xfe", '"a string"', "{}"])
def test_bad_manifest_json_refused(bundle_copy, text):
    (bundle_copy / "manifest.json").write_bytes(text.encode("latin-1"))
    with pytest.raises(BundleError, match="manifest"):
        vaeinfer.load(bundle_copy)


def test_io_disagreeing_with_facts_refused(bundle_copy):
    manifest = _read(bundle_copy)
    manifest["latent"]["dim"] = 5  # the graphs' listed shapes still say 4
    _write(bundle_copy, manifest)
    with pytest.raises(BundleError, match="imply"):
        vaeinfer.load(bundle_copy)
    manifest["latent"]["dim"] = 4
    manifest["graphs"]["decoder"]["outputs"][0]["name"] = "logits"
    _write(bundle_copy, manifest)
    with pytest.raises(BundleError, match="imply"):
        vaeinfer.load(bundle_copy)


def test_consistent_lie_refused_by_graph_signature(bundle_copy):
    """Facts and listed I/O agree with each other, but not with the graphs: the sessions' own
    signatures are checked against the spec."""
    manifest = _read(bundle_copy)
    manifest["latent"]["dim"] = 5
    for role, spec in vae_graphs((1, 20, 12), 5).items():
        manifest["graphs"][role].update(spec.io_json())
    _write(bundle_copy, manifest)
    with pytest.raises(BundleError, match="manifest promises"):
        vaeinfer.load(bundle_copy)


def test_swapped_graphs_refused(bundle_copy):
    enc, dec = bundle_copy / "encoder.onnx", bundle_copy / "decoder.onnx"
    a, b = enc.read_bytes(), dec.read_bytes()
    enc.write_bytes(b)
    dec.write_bytes(a)
    with pytest.raises(BundleError, match="sha256"):
        vaeinfer.load(bundle_copy)
    _resign(bundle_copy)
    with pytest.raises(BundleError, match="manifest promises"):
        vaeinfer.load(bundle_copy)


def test_foreign_graph_refused(bundle_copy, conv):
    """A decoder with the right names and latent size but another image shape."""
    shutil.copy(conv.bundle / "decoder.onnx", bundle_copy / "decoder.onnx")
    _resign(bundle_copy)
    with pytest.raises(BundleError, match="shape"):
        vaeinfer.load(bundle_copy)


def test_not_onnx_refused(bundle_copy):
    (bundle_copy / "encoder.onnx").write_bytes(b"this is not a protobuf")
    _resign(bundle_copy)
    with pytest.raises(BundleError, match="encoder"):
        vaeinfer.load(bundle_copy)


def test_external_data_never_read(bundle_copy, tmp_path):
    """A graph whose weights point at a file outside the bundle is refused; nothing is read from there."""
    model = onnx.load(str(bundle_copy / "encoder.onnx"))
    weight = max(model.graph.initializer, key=lambda t: len(t.raw_data))
    secret = tmp_path / "secret.bin"
    secret.write_bytes(weight.raw_data)  # the right bytes, so a loader that followed the path would succeed
    onnx.external_data_helper.set_external_data(weight, location=os.path.relpath(secret, bundle_copy))
    weight.ClearField("raw_data")
    weight.data_location = onnx.TensorProto.EXTERNAL
    (bundle_copy / "encoder.onnx").write_bytes(model.SerializeToString())
    _resign(bundle_copy)
    with pytest.raises(BundleError):
        vaeinfer.load(bundle_copy)


def test_verify_false_skips_hash_only(bundle_copy):
    manifest = _read(bundle_copy)
    manifest["graphs"]["encoder"]["sha256"] = "0" * 64
    _write(bundle_copy, manifest)
    with pytest.raises(BundleError, match="sha256"):
        vaeinfer.load(bundle_copy)
    assert vaeinfer.load(bundle_copy, verify=False).sample(1, seed=0).shape == (1, 1, 20, 12)


def test_info_files_and_path(mlp):
    vae = vaeinfer.load(mlp.bundle, device="cpu")
    manifest = _read(mlp.bundle)
    assert vae.info.files == {e["file"]: e["sha256"] for e in manifest["graphs"].values()}
    assert Path(vae.info.path) == mlp.bundle and vae.info.precisions == ("fp32",)
    assert vae.info.has_prior is False and vae.info.num_classes is None
