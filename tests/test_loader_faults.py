"""A malformed model folder fails with an error that names the file (and the field or tensor):
config.json fields of the wrong type or range, missing or unreadable files, a broken
safetensors index, checkpoint tensors of the wrong shape, dtype or values."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from pagedlm import LLM
from pagedlm.models import load_model

from llama_checkpoint import save_random_checkpoint

CONFIG = dict(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
              num_key_value_heads=1, max_position_embeddings=256, eos_token_id=2)


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    folder = tmp_path_factory.mktemp("good-model")
    save_random_checkpoint(folder, CONFIG)
    return folder


@pytest.fixture
def folder(good, tmp_path):
    """A fresh copy of the good folder, to break."""
    copy = tmp_path / "model"
    shutil.copytree(good, copy)
    return copy


def write_config(folder, **changes):
    config = {**CONFIG, **changes}
    (folder / "config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not DROP}))


DROP = object()


def test_the_good_folder_loads(good):
    assert LLM(good, device="cpu", num_blocks=8).eos_token_ids == {2}


@pytest.mark.parametrize("changes, message", [
    (dict(num_attention_heads=0), "num_attention_heads must be an integer >= 1, got 0"),
    (dict(hidden_size="32"), "hidden_size must be an integer >= 1, got '32'"),
    (dict(vocab_size=1.5), "vocab_size must be an integer >= 1, got 1.5"),
    (dict(vocab_size=DROP), "missing field 'vocab_size'"),
    (dict(num_hidden_layers=[1]), "num_hidden_layers must be an integer"),
    (dict(num_key_value_heads=3), "num_attention_heads (2) must be a multiple of num_key_value_heads (3)"),
    (dict(hidden_size=33), "hidden_size (33) must be a multiple of num_attention_heads (2)"),
    (dict(head_dim=15), "head_dim 15 must be even"),
    (dict(intermediate_size=-4), "intermediate_size must be an integer >= 1"),
    (dict(rms_norm_eps=-1e-5), "rms_norm_eps must be a finite number > 0"),
    (dict(rms_norm_eps=3.402823466385289e38), "rms_norm_eps must be a finite number > 0 (in float32)"),
    (dict(num_hidden_layers=15394264739849), "num_hidden_layers must be at most 4096"),
    (dict(rope_theta="10000"), "rope_theta must be a finite number > 0"),
    (dict(rope_scaling=[1, 2]), "rope_scaling must be a JSON object"),
    (dict(rope_scaling={"rope_type": "llama3"}), "missing field 'rope_scaling.factor'"),
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4, "high_freq_factor": 4}),
     "rope_scaling.high_freq_factor (4.0) must exceed low_freq_factor (4.0)"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 2.0}), "rope type 'yarn' is not supported"),
    (dict(rope_parameters=3), "rope_parameters must be a JSON object"),
    (dict(rope_parameters={"rope_theta": 0}), "rope_parameters.rope_theta must be a finite number > 0"),
    (dict(tie_word_embeddings="false"), "tie_word_embeddings must be a JSON true or false"),
    (dict(sliding_window=-5), "sliding_window must be an integer >= 0"),
    (dict(model_type="gpt2"), "model_type 'gpt2' is not one of"),
    (dict(eos_token_id="2"), "eos_token_id must be a token id or a list of them"),
    (dict(eos_token_id=[2, None]), "eos_token_id must be a token id or a list of them"),
])
def test_a_bad_config_field_is_named_with_the_file(folder, changes, message):
    write_config(folder, **changes)
    with pytest.raises(ValueError) as error:
        LLM(folder, device="cpu", num_blocks=8)
    assert str(error.value).startswith(f"{folder / 'config.json'}: ") and message in str(error.value)


@pytest.mark.parametrize("content, message", [
    (b"{not json", "not valid JSON"), (b"\xff\xfe{}", "not valid JSON"), (b"[1, 2]", "expected a JSON object"),
    (b"null", "expected a JSON object"),
])
def test_an_unreadable_config_names_the_file(folder, content, message):
    (folder / "config.json").write_bytes(content)
    with pytest.raises(ValueError, match=f"^{folder / 'config.json'}: {message}"):
        LLM(folder, device="cpu", num_blocks=8)


def test_missing_folders_and_files_are_named(folder, tmp_path):
    with pytest.raises(FileNotFoundError, match=f"^{tmp_path / 'absent'}: not a model folder"):
        LLM(tmp_path / "absent", device="cpu")
    with pytest.raises(FileNotFoundError, match=f"^{folder / 'config.json'}: not a model folder"):
        LLM(folder / "config.json", device="cpu")
    (folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=f"^{folder}: no \\*.safetensors weights"):
        LLM(folder, device="cpu")
    (folder / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=f"^{folder / 'config.json'}: no config.json"):
        LLM(folder, device="cpu")


@pytest.mark.parametrize("index, message", [
    ("{", "not valid JSON"), ('{"weight_map": ["model.safetensors"]}', "not a safetensors index"),
    ("[]", "not a safetensors index"), ('{"weight_map": {"a": 3}}', "not a safetensors index"),
])
def test_a_malformed_index_names_the_file(folder, index, message):
    (folder / "model.safetensors.index.json").write_text(index)
    with pytest.raises(ValueError, match=f"^{folder / 'model.safetensors.index.json'}: {message}"):
        load_model(folder)


def test_an_index_naming_a_missing_shard_names_the_shard(folder):
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "shard-2.safetensors"}}))
    with pytest.raises(FileNotFoundError, match=f"^{folder / 'shard-2.safetensors'}: listed in the index"):
        load_model(folder)


def rewrite_weights(folder, change):
    path = folder / "model.safetensors"
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path))
    return path


@pytest.mark.parametrize("change, message", [
    (lambda t: t.update({"model.norm.weight": torch.ones(31)}), r"model.norm.weight has shape \(31,\), the config"),
    (lambda t: t.update({"model.norm.weight": torch.ones(32, dtype=torch.int64)}),
     "model.norm.weight has dtype torch.int64, weights must be floating point"),
    (lambda t: t.update({"model.norm.weight": torch.full((32,), float("nan"))}),
     "model.norm.weight holds non-finite values"),
    (lambda t: t.update({"lm_head.weight": t["lm_head.weight"].clone().index_fill_(0, torch.tensor([3]),
                                                                                    float("inf"))}),
     "lm_head.weight holds non-finite values"),
])
def test_a_bad_tensor_is_named_with_its_file(folder, change, message):
    path = rewrite_weights(folder, change)
    with pytest.raises(ValueError, match=f"^{path}: {message}"):
        load_model(folder)


def test_a_missing_tensor_is_named_with_the_folder(folder):
    rewrite_weights(folder, lambda t: t.pop("model.layers.0.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=f"^{folder}: weights missing from the checkpoint: "
                                         r"model.layers.0.mlp.up_proj.weight"):
        load_model(folder)


def test_a_tensor_in_two_shards_is_named(folder):
    norm = load_file(str(folder / "model.safetensors"))["model.norm.weight"]
    save_file({"model.norm.weight": norm}, str(folder / "z-extra.safetensors"))
    with pytest.raises(ValueError, match=f"^{folder / 'z-extra.safetensors'}: model.norm.weight appears in more"):
        load_model(folder)


def test_a_truncated_weight_file_is_named(folder):
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match=f"^{path}: cannot read safetensors"):
        load_model(folder)


@pytest.mark.parametrize("changes, message", [
    (dict(num_hidden_layers=4096), "weights missing from the checkpoint: model.layers.1.self_attn.q_proj.weight"),
    (dict(vocab_size=10**12), r"model.embed_tokens.weight has shape \(50, 32\), the config implies \(1000000000000, 32\)"),
    (dict(intermediate_size=10**7), r"model.layers.0.mlp.gate_proj.weight has shape \(64, 32\)"),
])
def test_a_config_larger_than_its_checkpoint_is_refused_before_building_the_model(folder, changes, message):
    write_config(folder, **changes)
    with pytest.raises(ValueError, match=message):
        load_model(folder)


@pytest.mark.parametrize("changes", [{}, dict(tie_word_embeddings=True), dict(model_type="qwen2"), dict(head_dim=8),
                                     dict(num_hidden_layers=3)])
def test_expected_shapes_are_the_built_models(changes):
    from pagedlm.models import random_model
    from pagedlm.models.loader import checkpoint_names, expected_shapes
    model = random_model({**CONFIG, **changes})
    built = {name: tuple(param[rows].shape) for name, (param, rows) in checkpoint_names(model).items()
             if not (name == "lm_head.weight" and model.args.tie_word_embeddings)}
    assert dict(expected_shapes(model.args)) == built


@pytest.mark.parametrize("field", ["low_freq_factor", "high_freq_factor", "original_max_position_embeddings"])
def test_null_llama3_scaling_fields_take_their_defaults(folder, field):
    """A null field of llama3 rope scaling is the field left out (found by the config fuzz: a
    null original_max_position_embeddings reached the frequencies and raised a TypeError)."""
    from pagedlm.models.layers import rope_frequencies
    scaling = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=8192)
    write_config(folder, rope_scaling={**scaling, field: None})
    head_dim = CONFIG["hidden_size"] // CONFIG["num_attention_heads"]
    expected = rope_frequencies(head_dim, 10000.0, scaling)
    torch.testing.assert_close(load_model(folder, device="cpu").inv_freq, expected, rtol=0, atol=0)
