"""Hyperparameters: presets, env overrides, validation errors, the env-var table."""

import dataclasses
import json
import os
import re
import subprocess
import sys

import pytest
import torch

import env_table
import train_gpt
from tg_helpers import tiny_h


def test_default_is_the_record_configuration():
    h = train_gpt.Hyperparameters.from_env({})
    assert h.run.preset == "pr1855"
    shape = (h.model.vocab_size, h.model.num_layers, h.model.model_dim, h.model.num_heads, h.model.num_kv_heads, h.model.mlp_mult)
    assert shape == (8192, 11, 512, 8, 4, 4)
    assert (h.model.loop_start, h.model.loop_end, h.model.num_loops, h.model.enable_looping_at) == (3, 5, 3, 0.35)
    assert h.model.parallel_start_layer == 8 and h.model.smear_gate and h.model.sparse_attn_gate and h.optim.muon_polar_express
    assert h.optim.min_lr == 0.1 and h.optim.warmdown_frac == 0.85 and h.data.train_batch_tokens == 786432


def test_preset_sets_published_values_and_env_overrides_preset():
    h = train_gpt.Hyperparameters.from_env({"PRESET": "pr1493"})
    assert h.model.qk_gain_init == 5.25 and h.model.parallel_start_layer == 7 and h.optim.matrix_lr == 0.022
    assert h.eval.ttt_mode == "chunked" and not h.model.gated_attn and not h.model.smear_gate
    h = train_gpt.Hyperparameters.from_env({"PRESET": "pr1493", "QK_GAIN_INIT": "4.0", "MATRIX_LR": "0.03"})
    assert h.model.qk_gain_init == 4.0 and h.optim.matrix_lr == 0.03 and h.model.parallel_start_layer == 7


def test_child_presets_inherit_their_parent():
    pr1812 = train_gpt.Hyperparameters.from_env({"PRESET": "pr1812"})
    assert pr1812.model.qk_gain_init == 5.25 and pr1812.eval.ttt_epochs == 4 and pr1812.optim.muon_weight_decay_mlp == 0.115
    pr1736 = train_gpt.Hyperparameters.from_env({"PRESET": "pr1736"})
    assert pr1736.model.gated_attn and not pr1736.model.smear_gate and pr1736.eval.phased_ttt_lora_rank == 96


@pytest.mark.parametrize("preset", list(train_gpt.PRESETS))
def test_every_preset_resolves_and_validates(preset):
    h = train_gpt.Hyperparameters.from_env({"PRESET": preset})
    assert h.run.preset == preset
    with torch.device("meta"):  # build the full-size model without allocating memory
        model = train_gpt.GPT(h.model)
    parameters = sum(p.numel() for p in model.parameters())
    assert parameters > 100_000
    if preset in ("pr1736", "pr1855"):  # PR 1736 logs 35,989,658 parameters
        assert abs(parameters - 35_989_658) / 35_989_658 < 0.01


def test_baseline_preset_is_the_naive_baseline():
    h = train_gpt.Hyperparameters.from_env({"PRESET": "baseline"})
    assert (h.model.num_layers, h.model.model_dim, h.model.vocab_size, h.model.mlp_mult, h.model.mlp_act) == (9, 512, 1024, 2, "relu2")
    assert not (h.model.xsa or h.model.gated_attn or h.model.smear_gate or h.model.recurrence_enabled) and h.model.parallel_start_layer == -1
    assert h.quant.quant_scheme == "int8" and not h.eval.ttt_enabled


@pytest.mark.parametrize("env, needle", [
    ({"PRESET": "nope"}, "PRESET"),
    ({"MODEL_DIM": "100", "NUM_HEADS": "8"}, "MODEL_DIM"),
    ({"NUM_KV_HEADS": "3"}, "NUM_KV_HEADS"),
    ({"LOOP_END": "11"}, "LOOP_END"),
    ({"LOOP_START": "6", "LOOP_END": "5"}, "LOOP_START"),
    ({"PARALLEL_START_LAYER": "4"}, "PARALLEL_START_LAYER"),
    ({"ATTN_BACKEND": "magic"}, "ATTN_BACKEND"),
    ({"TTT_MODE": "sometimes"}, "TTT_MODE"),
    ({"NUM_LAYERS": "eleven"}, "NUM_LAYERS"),
    ({"XSA": "maybe"}, "XSA"),
    ({"ROPE_DIMS": "7"}, "ROPE_DIMS"),
    ({"VOCAB_SIZE": "70000"}, "VOCAB_SIZE"),
    ({"GPTQ_RESERVE_SECONDS": "700"}, "GPTQ_RESERVE_SECONDS"),
    ({"SMEAR_GATE": "1", "SMEAR_GATE_DIMS": "0"}, "SMEAR_GATE_DIMS"),
    ({"GATED_ATTN": "0", "SPARSE_ATTN_GATE": "1"}, "SPARSE_ATTN_GATE"),
    ({"PHASED_TTT_LORA_SITES": "q,attention"}, "PHASED_TTT_LORA_SITES"),
    ({"PHASED_TTT_LORA_SITES": " , "}, "PHASED_TTT_LORA_SITES"),
    ({"GPTQ_GENERATED_SEQ_LEN": "1"}, "GPTQ_GENERATED_SEQ_LEN"),
    ({"GPTQ_GENERATED_TEMPERATURE": "0"}, "GPTQ_GENERATED_TEMPERATURE"),
    ({"GPTQ_CALIBRATION_BATCHES": "-1"}, "GPTQ_CALIBRATION_BATCHES"),
    ({"GPTQ_CALIBRATION_SOURCE": "val"}, "GPTQ_CALIBRATION_SOURCE"),
    ({"SAVE_TOKEN_NLL": "perhaps"}, "SAVE_TOKEN_NLL"),
    ({"PHASED_TTT_CHUNK_TOKENS": "4096"}, "PHASED_TTT_CHUNK_TOKENS"),
    ({"LQER_SCHEME": "svd"}, "LQER_SCHEME"),
    ({"LQER_BITS": "8"}, "LQER_BITS"),
    ({"TRAIN_SEQ_SCHEDULE": "1024@0.5,2048"}, "TRAIN_SEQ_SCHEDULE"),
    ({"TRAIN_SEQ_SCHEDULE": "1024@0.5,4096@1"}, "TRAIN_SEQ_SCHEDULE.*TRAIN_SEQ_LEN=2048"),
    ({"TRAIN_SEQ_SCHEDULE": "1024@0.7,512@0.5,2048@1"}, "TRAIN_SEQ_SCHEDULE"),
    ({"TRAIN_SEQ_SCHEDULE": "1024@0.5,2048@1", "WARMUP_STEPS": "3"}, "WARMUP_STEPS=3 must cover"),
    ({"WEIGHT_DECAY_SCHEDULE": "0.4,0.85,0.5"}, "WEIGHT_DECAY_SCHEDULE"),
    ({"WEIGHT_DECAY_SCHEDULE": "0.9,0.5,0.5,1.75"}, "WEIGHT_DECAY_SCHEDULE"),
    ({"WEIGHT_DECAY_SCHEDULE": "0.4,0.85,-0.5,1.75"}, "WEIGHT_DECAY_SCHEDULE"),
    ({"AWQ_LITE_BITS": "9"}, "AWQ_LITE_BITS"), ({"PHASED_TTT_LOCAL_LR_MULT": "-1"}, "PHASED_TTT_LOCAL_LR_MULT"),
    ({"TRAIN_PACKING": "documents"}, "TRAIN_PACKING"),
])
def test_invalid_settings_fail_naming_the_env_var(env, needle):
    with pytest.raises(ValueError, match=needle):
        train_gpt.Hyperparameters.from_env(env)


def test_batch_layout_checks_divisibility():
    h = tiny_h(TRAIN_BATCH_TOKENS=4096)
    assert h.data.batch_layout(1) == (8, 4) and h.data.batch_layout(2) == (4, 4) and h.data.batch_layout(8) == (1, 4)
    with pytest.raises(ValueError, match="TRAIN_BATCH_TOKENS"):
        tiny_h(TRAIN_BATCH_TOKENS=1000).data.batch_layout(1)


def test_env_var_table_covers_every_field_with_help():
    table = env_table.env_var_table()
    fields = [f.name for settings in train_gpt.SECTIONS.values() for f in dataclasses.fields(settings)]
    assert [row["env"] for row in table] == [name.upper() for name in fields]
    assert len(set(fields)) == len(fields)  # one flat namespace: an env var names exactly one setting
    names = {row["env"] for row in table}
    for challenge_name in ("DATA_PATH", "VOCAB_SIZE", "ITERATIONS", "MAX_WALLCLOCK_SECONDS", "TRAIN_BATCH_TOKENS",
                           "TRAIN_SEQ_LEN", "SEED", "RUN_ID", "ARTIFACT_DIR", "TTT_ENABLED", "PHASED_TTT_PREFIX_DOCS",
                           "GPTQ_RESERVE_SECONDS", "LQER_RANK", "SLIDING_STRIDE", "QUANT_EMBED_BITS"):
        assert challenge_name in names
    assert all(row["help"] and row["section"] in env_table.SECTION_TITLES for row in table)


def test_a_field_without_a_help_comment_is_an_error():
    source = "class ModelSettings:\n    vocab_size: int = 8192  # vocabulary size\n    num_layers: int = 11\n"
    helps = env_table.field_help(source)
    assert helps == {("ModelSettings", "vocab_size"): "vocabulary size", ("ModelSettings", "num_layers"): ""}


SNAPSHOT = json.load(open(os.path.join(os.path.dirname(__file__), "fixtures", "env_snapshot_9353cc0.json")))["presets"]
# deliberate changes since the snapshot, each with its reason
CHANGED_SINCE_SNAPSHOT = {
    # PR 1736 and PR 1855 never ran a sliding-window eval (it costs eval time the TTT needs); PR 1493 did
    ("pr1855", "SLIDING_WINDOW_ENABLED"): False, ("pr1736", "SLIDING_WINDOW_ENABLED"): False,
    ("tiny", "SLIDING_WINDOW_ENABLED"): False,
    # the PR 1855 line stores its quantized codes with rANS (per-role tables; ~2.5% smaller than brotli-11)
    ("pr1855", "QUANT_COMPRESSOR"): "rans", ("tiny", "QUANT_COMPRESSOR"): "rans",
    # LoRA sites as PR 1855 places them: O from the normed attention input, one MLP bypass (PR 1736 too)
    **{(preset, "PHASED_TTT_LORA_SITES"): "q,k,v,o,mlp,head" for preset in SNAPSHOT},
    # GPTQ calibration on random windows of the rank's train shards, as PR 1736/1855 (the PR 1493 line
    # calibrates on its training batches; PR 1274 samples from the model)
    **{(preset, "GPTQ_CALIBRATION_SOURCE"): "windows" for preset in ("pr1855", "pr1736", "tiny") if preset in SNAPSHOT},
}
for (preset_name, env_name), new_value in CHANGED_SINCE_SNAPSHOT.items():
    SNAPSHOT[preset_name][env_name] = new_value


@pytest.mark.parametrize("preset", sorted(SNAPSHOT))
def test_every_env_var_of_the_flat_settings_resolves_to_the_same_value(preset):
    """Every env var of the table before the settings were cut into sections (snapshot of commit
    9353cc0) still exists and resolves to the same value under every preset, and setting it
    explicitly reaches the same field."""
    flat = train_gpt.Hyperparameters.from_env({"PRESET": preset}).as_dict()
    for env, value in SNAPSHOT[preset].items():
        assert flat[env.lower()] == value, env
    reached = 0
    for env, value in SNAPSHOT[preset].items():
        if env == "PRESET":
            continue
        changed = (not value) if isinstance(value, bool) else value
        try:
            h = train_gpt.Hyperparameters.from_env({"PRESET": preset, env: str(int(changed) if isinstance(changed, bool)
                                                                             else changed)})
        except ValueError as error:  # a flipped switch may break a cross-check (SPARSE_ATTN_GATE needs GATED_ATTN)
            assert "is not a valid" not in str(error) and "not a train_gpt.py setting" not in str(error), error
            continue
        section = train_gpt.knob_fields()[env.lower()][0]
        assert getattr(getattr(h, section), env.lower()) == changed, env
        reached += 1
    assert reached >= len(SNAPSHOT[preset]) - 5


@pytest.mark.parametrize("env, nearest", [
    ({"NUM_LAYER": "3"}, "NUM_LAYERS"), ({"MAX_WALLCLOK_SECONDS": "1"}, "MAX_WALLCLOCK_SECONDS"),
    ({"TTT_EPOCH": "2"}, "TTT_EPOCHS"), ({"MATRIX_LR_": "0.1"}, "MATRIX_LR"),
    ({"QUANT_SOMETHING_NEW": "1"}, None), ({"PHASED_TTT_SOMETHING_ELSE": "1"}, None),
])
def test_an_env_var_that_looks_like_a_knob_but_is_none_is_refused(env, nearest):
    with pytest.raises(ValueError, match=list(env)[0]) as error:
        train_gpt.Hyperparameters.from_env(env)
    assert (f"did you mean {nearest}?" in str(error.value)) if nearest else "did you mean" not in str(error.value)
    ignored = train_gpt.Hyperparameters.from_env(dict(env, IGNORE_ENV=f"OTHER,{list(env)[0]}"))  # the escape hatch
    assert ignored.model.num_layers == 11


def test_unrelated_environment_variables_are_left_alone():
    unrelated = {"PATH": "/bin", "HOME": "/root", "CUDA_VISIBLE_DEVICES": "0", "OMP_NUM_THREADS": "1", "RANK": "0",
                 "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "x", "MASTER_PORT": "1", "MAX_JOBS": "4",
                 "PYTHONPATH": ".", "CI": "true", "TORCHELASTIC_RUN_ID": "x", "LOCAL_WORLD_SIZE": "1"}
    assert train_gpt.Hyperparameters.from_env(unrelated).model.num_layers == 11
    train_gpt.Hyperparameters.from_env(dict(os.environ))  # this machine's own environment passes too


@pytest.mark.parametrize("env", [{"MATRIX_LR": "nan"}, {"MATRIX_LR": "-0.01"}, {"EMBED_LR": "0"},
                                 {"SCALAR_LR": "inf"}, {"TTT_LR": "-1"}, {"PHASED_TTT_LR": "nan"},
                                 {"MUON_MOMENTUM": "1.5"}, {"ADAM_BETA2": "-0.1"}, {"GRAD_CLIP_NORM": "-1"},
                                 {"EVAL_SEQ_LEN": "0"}, {"MUON_WEIGHT_DECAY": "-0.1"}, {"EMA_DECAY": "-0.5"}])
def test_nonsensical_numbers_are_refused_naming_the_variable(env):
    with pytest.raises(ValueError, match=list(env)[0]):
        train_gpt.Hyperparameters.from_env(env)


def test_integers_accept_scientific_notation_but_not_fractions():
    assert tiny_h(ITERATIONS="1e3").optim.iterations == 1000
    with pytest.raises(ValueError, match="ITERATIONS"):
        tiny_h(ITERATIONS="2.5")


def test_import_has_no_side_effects(tmp_path):
    code = ("import sys, torch, torch.distributed as dist; import train_gpt; "
            "assert not dist.is_initialized(); assert not torch.cuda.is_initialized(); print('clean')")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                            env={"PYTHONPATH": train_gpt.__file__.rsplit("/", 1)[0], "PATH": "/usr/bin:/bin",
                                 "PYTHONDONTWRITEBYTECODE": "1"})
    assert result.returncode == 0, result.stderr
    assert "clean" in result.stdout and list(tmp_path.iterdir()) == []


def test_env_table_markdown_lists_every_variable():
    markdown = env_table.env_var_markdown()
    rows = [line for line in markdown.splitlines() if line.startswith("| `")]
    table = env_table.env_var_table()
    assert [row.split("`")[1] for row in rows] == sorted((r["env"] for r in table),
                                                         key=[r["env"] for r in table].index)
    assert "| `PRESET` | `pr1855` |" in markdown
    # every row has exactly 3 cells: a | inside a default or a help text is escaped
    assert all(len(re.split(r"(?<!\\)\|", row)) == 5 for row in rows)
    assert markdown.count("### ") == len(env_table.SECTION_TITLES)


def test_readme_env_table_is_the_generated_one():
    """The README's table never drifts: it must equal `python docs/env_table.py`."""
    readme = open(os.path.join(os.path.dirname(train_gpt.__file__), "README.md"), encoding="utf-8").read()
    begin, end = "<!-- env-table:begin -->\n", "\n<!-- env-table:end -->"
    assert begin in readme and end in readme, "README.md lacks the env-table markers"
    table = readme[readme.index(begin) + len(begin):readme.index(end)]
    assert table.strip() == env_table.env_var_markdown().strip(), (
        "README env table is stale: replace it with the output of `python docs/env_table.py`")


def test_knob_names_are_read_from_the_source_of_a_plain_or_packed_script(tmp_path):
    """sweep.py checks sweep files against these names; they must be exactly the settings, also when
    read from the counted (packed) script, which is unpacked but never executed."""
    names = env_table.knob_names(train_gpt.__file__)
    assert names == {row["env"] for row in env_table.env_var_table()}
    packed = tmp_path / "packed.py"
    packed.write_text(train_gpt.pack_code(open(train_gpt.__file__, encoding="utf-8").read()))
    assert env_table.knob_names(str(packed)) == names
    (tmp_path / "other.py").write_text("x = 1\n")
    with pytest.raises(ValueError, match="no settings found"):
        env_table.knob_names(str(tmp_path / "other.py"))


def test_seq_len_at_follows_the_schedule_stage_by_stage():
    """Reference: stage k covers progress in [until_{k-1}, until_k); progress 1 stays in the last stage."""
    h = train_gpt.Hyperparameters.from_env({"TRAIN_SEQ_LEN": "3072", "TRAIN_SEQ_SCHEDULE": "1024@0.1,2048@0.7,3072@1"})
    schedule = h.data.seq_schedule()
    assert schedule == [(1024, 0.1), (2048, 0.7), (3072, 1.0)]
    for progress in [i / 200 for i in range(201)]:
        expected = 1024 if progress < 0.1 else 2048 if progress < 0.7 else 3072
        assert train_gpt.seq_len_at(schedule, progress) == expected, progress
    assert train_gpt.Hyperparameters.from_env({}).data.seq_schedule() == [(2048, 1.0)]  # off in pr1855
    pr2014 = train_gpt.Hyperparameters.from_env({"PRESET": "pr2014"}).data
    assert pr2014.seq_schedule() == schedule and all(pr2014.batch_layout(8, length) == (1, 786432 // 8 // length)
                                                    for length, _ in schedule)


def test_flat_packing_is_pr1855_s_and_runs_only_on_the_cu_seqlens_backends():
    """PR 1855 (and the presets built on it) pack a micro-batch as one flat row; PR 1493's line, which
    predates varlen document packing, keeps rows. Flat takes effect with fa3/varlen only: the dense-mask
    backends (and flex, unmeasured at that size) keep rows, e.g. sdpa, which `auto` picks on CPU."""
    packing = {name: train_gpt.Hyperparameters.from_env({"PRESET": name}).data.train_packing for name in train_gpt.PRESETS}
    assert {name for name, value in packing.items() if value == "rows"} == {"pr1493", "pr1812", "pr1755", "pr1274",
                                                                            "baseline"}
    assert all(train_gpt.packs_flat("flat", backend) for backend in ("fa3", "varlen"))
    assert not any(train_gpt.packs_flat("flat", backend) for backend in ("sdpa", "plain", "flex"))
    assert not any(train_gpt.packs_flat("rows", backend) for backend in train_gpt.ATTENTION_BACKENDS)
