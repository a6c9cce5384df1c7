"""Hyperparameters: presets, env overrides, validation errors, the env-var table."""

import dataclasses
import os
import re
import subprocess
import sys

import pytest
import torch

import train_gpt
from tg_helpers import tiny_h


def test_default_is_the_record_configuration():
    h = train_gpt.Hyperparameters.from_env({})
    assert h.preset == "pr1855"
    shape = (h.vocab_size, h.num_layers, h.model_dim, h.num_heads, h.num_kv_heads, h.mlp_mult)
    assert shape == (8192, 11, 512, 8, 4, 4)
    assert (h.loop_start, h.loop_end, h.num_loops, h.enable_looping_at) == (3, 5, 3, 0.35)
    assert h.parallel_start_layer == 8 and h.smear_gate and h.sparse_attn_gate and h.muon_polar_express
    assert h.min_lr == 0.1 and h.warmdown_frac == 0.85 and h.train_batch_tokens == 786432


def test_preset_sets_published_values_and_env_overrides_preset():
    h = train_gpt.Hyperparameters.from_env({"PRESET": "pr1493"})
    assert h.qk_gain_init == 5.25 and h.parallel_start_layer == 7 and h.matrix_lr == 0.022
    assert h.ttt_mode == "chunked" and not h.gated_attn and not h.smear_gate
    h = train_gpt.Hyperparameters.from_env({"PRESET": "pr1493", "QK_GAIN_INIT": "4.0", "MATRIX_LR": "0.03"})
    assert h.qk_gain_init == 4.0 and h.matrix_lr == 0.03 and h.parallel_start_layer == 7


def test_child_presets_inherit_their_parent():
    pr1812 = train_gpt.Hyperparameters.from_env({"PRESET": "pr1812"})
    assert pr1812.qk_gain_init == 5.25 and pr1812.ttt_epochs == 4 and pr1812.muon_weight_decay_mlp == 0.115
    pr1736 = train_gpt.Hyperparameters.from_env({"PRESET": "pr1736"})
    assert pr1736.gated_attn and not pr1736.smear_gate and pr1736.phased_ttt_lora_rank == 96


@pytest.mark.parametrize("preset", list(train_gpt.PRESETS))
def test_every_preset_resolves_and_validates(preset):
    h = train_gpt.Hyperparameters.from_env({"PRESET": preset})
    assert h.preset == preset
    with torch.device("meta"):  # build the full-size model without allocating memory
        model = train_gpt.GPT(h)
    parameters = sum(p.numel() for p in model.parameters())
    assert parameters > 100_000
    if preset in ("pr1736", "pr1855"):  # PR 1736 logs 35,989,658 parameters
        assert abs(parameters - 35_989_658) / 35_989_658 < 0.01


def test_baseline_preset_is_the_naive_baseline():
    h = train_gpt.Hyperparameters.from_env({"PRESET": "baseline"})
    assert (h.num_layers, h.model_dim, h.vocab_size, h.mlp_mult, h.mlp_act) == (9, 512, 1024, 2, "relu2")
    assert not (h.xsa or h.gated_attn or h.smear_gate or h.recurrence_enabled) and h.parallel_start_layer == -1
    assert h.quant_scheme == "int8" and not h.ttt_enabled


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
])
def test_invalid_settings_fail_naming_the_env_var(env, needle):
    with pytest.raises(ValueError, match=needle):
        train_gpt.Hyperparameters.from_env(env)


def test_batch_layout_checks_divisibility():
    h = tiny_h(TRAIN_BATCH_TOKENS=4096)
    assert h.batch_layout(1) == (8, 4) and h.batch_layout(2) == (4, 4) and h.batch_layout(8) == (1, 4)
    with pytest.raises(ValueError, match="TRAIN_BATCH_TOKENS"):
        tiny_h(TRAIN_BATCH_TOKENS=1000).batch_layout(1)


def test_env_var_table_covers_every_field_with_help():
    table = train_gpt.env_var_table()
    assert len(table) == len(dataclasses.fields(train_gpt.Hyperparameters))
    names = {row["env"] for row in table}
    for challenge_name in ("DATA_PATH", "VOCAB_SIZE", "ITERATIONS", "MAX_WALLCLOCK_SECONDS", "TRAIN_BATCH_TOKENS",
                           "TRAIN_SEQ_LEN", "SEED", "RUN_ID", "ARTIFACT_DIR", "TTT_ENABLED", "PHASED_TTT_PREFIX_DOCS",
                           "GPTQ_RESERVE_SECONDS", "LQER_RANK", "SLIDING_STRIDE", "QUANT_EMBED_BITS"):
        assert challenge_name in names
    assert all(row["help"] and row["section"] for row in table)


def test_integers_accept_scientific_notation_but_not_fractions():
    assert tiny_h(ITERATIONS="1e3").iterations == 1000
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
    markdown = train_gpt.env_var_markdown()
    rows = [line for line in markdown.splitlines() if line.startswith("| `")]
    assert [row.split("`")[1] for row in rows] == sorted((r["env"] for r in train_gpt.env_var_table()),
                                                         key=[r["env"] for r in train_gpt.env_var_table()].index)
    assert "| `PRESET` | `pr1855` |" in markdown
    # every row has exactly 3 cells: a | inside a default or a help text is escaped
    assert all(len(re.split(r"(?<!\\)\|", row)) == 5 for row in rows)
    assert markdown.count("### ") == len(train_gpt.ENV_SECTION_TITLES)


def test_readme_env_table_is_the_generated_one():
    """The README's table never drifts: it must equal `python train_gpt.py --env-table`."""
    readme = open(os.path.join(os.path.dirname(train_gpt.__file__), "README.md"), encoding="utf-8").read()
    begin, end = "<!-- env-table:begin -->\n", "\n<!-- env-table:end -->"
    assert begin in readme and end in readme, "README.md lacks the env-table markers"
    table = readme[readme.index(begin) + len(begin):readme.index(end)]
    assert table.strip() == train_gpt.env_var_markdown().strip(), (
        "README env table is stale: replace it with the output of `python train_gpt.py --env-table`")
