"""Write the bad-input corpus: malformed data and config files, one per mistake users make.

``cases.yaml`` lists each case: the command-line arguments and a phrase the one-line error must
contain. tests/test_bad_inputs.py runs every case and checks exit status 2, one line, no
traceback, and no output folder. Re-run this script after changing a case.
"""

import json
from pathlib import Path

import yaml

HERE = Path(__file__).parent
GOOD = {"instruction": "Say hi", "output": "hi"}


def jsonl(name: str, *rows, raw: bytes | None = None) -> str:
    path = HERE / "data" / name
    path.parent.mkdir(exist_ok=True)
    if raw is not None:
        path.write_bytes(raw)
    else:
        path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return f"data/{name}"


def config(name: str, text: str) -> str:
    path = HERE / "configs" / name
    path.parent.mkdir(exist_ok=True)
    path.write_text(text)
    return f"configs/{name}"


BASE = """model: tiny-llama
output_dir: out/{name}
method:
  name: lora
  r: 4
data:
  train: {train}
  max_length: 64
training:
  max_steps: 1
  progress: false
"""

CASES = []


def data_case(name, expect, *rows, raw=None, suffix=".jsonl", extra=""):
    train = jsonl(name + suffix, *rows, raw=raw)
    cfg = config(name + ".yaml", BASE.format(name=name, train=train) + extra)
    CASES.append({"name": name, "args": ["train", cfg], "expect": expect})


def config_case(name, expect, text, overrides=()):
    cfg = config(name + ".yaml", text)
    CASES.append({"name": name, "args": ["train", cfg, *overrides], "expect": expect})


def main() -> None:
    ok = jsonl("good.jsonl", GOOD, GOOD)
    base = BASE.format(name="{name}", train=ok)

    # -- data ----------------------------------------------------------------------------------
    data_case("missing_output", ":2: 'output' is missing", GOOD, {"instruction": "x"})
    data_case("missing_instruction", ":1: 'instruction' is missing", {"output": "x"})
    data_case(
        "output_wrong_type",
        "'output' must be a string, got list",
        {"instruction": "a", "output": [1]},
    )
    data_case("empty_output", "'output' is empty", {"instruction": "a", "output": "  "})
    data_case("empty_file", "no records (the file is empty)", raw=b"")
    data_case("binary_file", "looks like a binary file", raw=bytes(range(256)) * 4)
    data_case(
        "latin1_encoding",
        ":2: not valid UTF-8",
        raw=b'{"instruction": "a", "output": "b"}\n{"instruction": "caf\xe9", "output": "b"}\n',
    )
    data_case(
        "truncated_last_line",
        ":2: invalid JSON",
        raw=b'{"instruction": "a", "output": "b"}\n{"instruction": "a", "out',
    )
    data_case("line_not_object", ":1: each line must be a JSON object", "42")
    data_case(
        "chat_no_assistant",
        "has no assistant turn",
        {"messages": [{"role": "user", "content": "hi"}]},
    )
    data_case(
        "chat_bad_role",
        "'messages[1].role' is 'bot'",
        {"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]},
    )
    data_case(
        "chat_content_not_string",
        "'messages[1].content' must be a string",
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": 5}]},
    )
    data_case("chat_messages_not_list", "'messages' must be a list", {"messages": "hello"})
    data_case("chat_empty_messages", "'messages' is empty", {"messages": []})
    data_case(
        "chat_same_role_twice",
        "two 'user' messages in a row",
        {
            "messages": [
                {"role": "user", "content": "a"},
                {"role": "user", "content": "b"},
                {"role": "assistant", "content": "c"},
            ]
        },
    )
    data_case(
        "chat_starts_with_assistant",
        "must start with a user message",
        {
            "messages": [
                {"role": "assistant", "content": "a"},
                {"role": "user", "content": "b"},
                {"role": "assistant", "content": "c"},
            ]
        },
    )
    data_case(
        "chat_system_in_middle",
        "only the first message may be one",
        {
            "messages": [
                {"role": "user", "content": "a"},
                {"role": "system", "content": "b"},
                {"role": "assistant", "content": "c"},
            ]
        },
    )
    data_case(
        "chat_empty_assistant",
        "an assistant turn must say something",
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": ""}]},
    )
    data_case(
        "unknown_layout",
        "unknown record layout (keys: answer, question)",
        {"question": "a", "answer": "b"},
    )
    data_case(
        "preference_in_sft", "a preference record", {"prompt": "a", "chosen": "b", "rejected": "c"}
    )
    data_case("text_in_sft", "a plain 'text' record", {"text": "just text"})
    data_case(
        "csv_extra_values",
        ":3: more values than header columns",
        suffix=".csv",
        raw=b"instruction,output\na,b\nc,d,e\n",
    )
    data_case(
        "json_not_list",
        ":1: a .json data file must hold a list of records",
        suffix=".json",
        raw=b'"hello"',
    )
    data_case(
        "json_invalid",
        ":2: invalid JSON",
        suffix=".json",
        raw=b'[{"instruction": "a",\n "output": }]',
    )
    data_case(
        "parquet_corrupt",
        "not a readable Parquet file",
        suffix=".parquet",
        raw=b"PAR1 this is not parquet",
    )
    data_case(
        "prompt_longer_than_max_length",
        "no training sample keeps a supervised token within data.max_length=64",
        {"instruction": "word " * 200, "output": "ok"},
    )
    data_case("eval_file_bad", "eval_bad.jsonl:1: 'output' is missing", GOOD, extra="")
    # the eval case needs an eval file: rewrite its config
    eval_bad = jsonl("eval_bad.jsonl", {"instruction": "x"})
    CASES[-1]["args"] = [
        "train",
        config(
            "eval_file_bad.yaml",
            BASE.format(name="eval_file_bad", train=ok).replace(
                f"  train: {ok}\n", f"  train: {ok}\n  eval: {eval_bad}\n"
            ),
        ),
    ]

    # -- config --------------------------------------------------------------------------------
    config_case("invalid_yaml", "invalid YAML", "model: [tiny\noutput_dir: x\n")
    config_case("yaml_not_mapping", ":1: a config must be a mapping", "- model\n- output_dir\n")
    config_case(
        "unknown_top_key",
        "unknown key 'modle' in the top level; did you mean 'model'?",
        base.format(name="k") + "modle: x\n",
    )
    config_case(
        "unknown_training_key",
        "unknown key 'learnin_rate' in training; did you mean 'learning_rate'?",
        base.format(name="k") + "  learnin_rate: 1\n",
    )
    config_case(
        "batch_size_not_int",
        "'training.batch_size' must be an integer",
        base.format(name="k") + "  batch_size: four\n",
    )
    config_case(
        "batch_size_zero",
        "'training.batch_size' must be at least 1",
        base.format(name="k") + "  batch_size: 0\n",
    )
    config_case(
        "negative_learning_rate",
        "'training.learning_rate' must be positive",
        base.format(name="k") + "  learning_rate: -0.001\n",
    )
    config_case(
        "r_zero", "'method.r' must be at least 1", base.format(name="k").replace("r: 4", "r: 0")
    )
    config_case(
        "lora_dropout_one",
        "'method.lora_dropout' must be in [0, 1)",
        base.format(name="k").replace("r: 4", "r: 4\n  lora_dropout: 1.0"),
    )
    config_case(
        "target_modules_match_nothing",
        "matches no layer of this model",
        base.format(name="k").replace("r: 4", "r: 4\n  target_modules: [attn_qkv]"),
    )
    config_case(
        "warmup_ratio_out_of_range",
        "'training.warmup_ratio' must be in [0, 1)",
        base.format(name="k") + "  warmup_ratio: 1.5\n",
    )
    config_case(
        "unknown_method",
        "'method.name' is 'lorra'; choose one of",
        base.format(name="k").replace("name: lora", "name: lorra"),
    )
    config_case(
        "unknown_scheduler",
        "'training.lr_scheduler' is 'cosin'; choose one of",
        base.format(name="k") + "  lr_scheduler: cosin\n",
    )
    config_case(
        "unknown_dtype",
        "'training.dtype' is 'fp8'; choose one of",
        base.format(name="k") + "  dtype: fp8\n",
    )
    config_case(
        "missing_model",
        "'model' is required",
        base.format(name="k").replace("model: tiny-llama\n", ""),
    )
    config_case(
        "missing_train",
        "'data.train' is required",
        base.format(name="k").replace(f"  train: {ok}\n", ""),
    )
    config_case("empty_config", "'model' is required", "")
    config_case(
        "section_not_mapping",
        "'training' must be a mapping",
        base.format(name="k").split("training:")[0] + "training: 5\n",
    )
    config_case(
        "max_length_too_small",
        "'data.max_length' must be at least 8",
        base.format(name="k").replace("max_length: 64", "max_length: 2"),
    )
    config_case(
        "model_path_missing",
        "model 'configs/nowhere': no such folder or file",
        base.format(name="k").replace("tiny-llama", "configs/nowhere"),
    )
    config_case(
        "hub_id_offline",
        "the hub cannot be reached (offline)",
        base.format(name="k").replace("tiny-llama", "someone/no-such-model-xyz"),
    )
    config_case(
        "model_folder_without_config",
        "not a model folder (no config.json)",
        base.format(name="k").replace("tiny-llama", "configs"),
    )
    config_case(
        "gguf_missing",
        "GGUF file not found",
        base.format(name="k").replace("tiny-llama", "nothing.gguf"),
    )
    config_case(
        "data_file_missing",
        "data file not found",
        base.format(name="k").replace(ok, "data/nope.jsonl"),
    )
    config_case("data_is_folder", "is a folder", base.format(name="k").replace(ok, "data"))
    config_case(
        "data_unknown_suffix",
        "unknown data format '.txt'",
        base.format(name="k").replace(ok, "configs/../make_corpus.txt"),
    )
    config_case(
        "output_dir_is_a_file",
        "is a file; choose a folder path",
        base.format(name="k").replace("out/k", "cases.yaml"),
    )
    config_case(
        "bad_override_value",
        "'training.learning_rate' must be a number",
        base.format(name="k"),
        ["training.learning_rate=fast"],
    )
    config_case(
        "bad_override_syntax",
        "must look like key=value",
        base.format(name="k"),
        ["training.learning_rate"],
    )
    CASES.append(
        {
            "name": "config_file_missing",
            "args": ["train", "configs/does_not_exist.yaml"],
            "expect": "config file not found",
        }
    )
    (HERE / "configs" / "not_utf8.yaml").write_bytes(b"model: caf\xe9\n")
    CASES.append(
        {
            "name": "config_not_utf8",
            "args": ["train", "configs/not_utf8.yaml"],
            "expect": "not a UTF-8 text file",
        }
    )
    CASES.append(
        {
            "name": "resume_without_checkpoint",
            "args": ["train", config("resume.yaml", base.format(name="resume")), "--resume"],
            "expect": "no checkpoint to resume from",
        }
    )
    (HERE / "make_corpus.txt").write_text("not data\n")
    (HERE / "cases.yaml").write_text(yaml.safe_dump(CASES, sort_keys=False, width=200))
    print(f"{len(CASES)} cases")


if __name__ == "__main__":
    main()
