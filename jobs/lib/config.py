"""One YAML file describes a run; every job takes the same file.

Defaults live here and only here. `load_config` merges defaults + file + `--set key=value` overrides,
validates the result before any work starts, and turns every problem into a one-line T2SError.
Secrets never live in the config: `secret()` reads them from the environment or `.env`, and a config that
holds one (a known secret's value, or anything token-shaped: jobs/lib/credentials.py) is refused without echoing it.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from jobs.lib.errors import T2SError
from jobs.lib.credentials import SECRET_NAMES, find_secret_in_config, redact, secret  # noqa: F401 (secret: re-exported)


class Section(BaseModel):
    # Unknown keys are errors (a typo must not silently fall back to a default); types are not coerced; a number is
    # finite (1e400 reads as infinity, which validates against gt=0 but trains or times out forever).
    model_config = ConfigDict(extra="forbid", strict=True, protected_namespaces=(), allow_inf_nan=False)


class ModelConfig(Section):
    # A Hub id, a local folder, or "tiny": a few-MB Llama built at run time (the no-network default).
    name_or_path: str = "TinyLlama/TinyLlama-1.1B-Chat-v1.0"
    tokenizer: str | None = None  # defaults to name_or_path
    gguf_file: str | None = None  # for models shipped as GGUF (the SmolLM2 stand-in)
    attn_implementation: Literal["auto", "flash_attention_2", "flex_attention", "sdpa", "eager"] = "auto"
    # What the model runs in for merge's check, eval and ask, and the frozen base of LoRA / QLoRA (auto: bf16 on a
    # GPU that has it, fp32 otherwise). Full fine-tunes keep their trainable weights as train.precision says.
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"


class DataConfig(Section):
    # A Hub dataset id, a local json/jsonl/parquet file or folder, or "synthetic" (built in, no network).
    source: str = "b-mc2/sql-create-context"
    synthetic_rows: int = Field(default=3000, gt=0)
    max_rows: int | None = Field(default=None, gt=0)  # cap on rows read (smoke runs)
    validation_fraction: float = Field(default=0.05, ge=0, lt=1)
    test_fraction: float = Field(default=0.05, ge=0, lt=1)
    # Rows already split by the source ("validation.jsonl" beside "train.jsonl") are used as given.
    use_source_splits: bool = True
    seed: int = 42
    max_length: int = Field(default=512, gt=8)  # tokens; longer rows are dropped and counted
    max_reject_fraction: float = Field(default=0.05, ge=0, le=1)


class LoraSettings(Section):
    r: int = Field(default=16, gt=0)
    alpha: int = Field(default=32, gt=0)
    dropout: float = Field(default=0.05, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    # Modules trained in full beside the adapter (e.g. embed_tokens, lm_head for a model built from scratch).
    modules_to_save: list[str] | None = None


# How the trainable weights are kept (bf16 keeps 8 bits of mantissa, so small AdamW steps round away in bf16 weights):
#   fp32_master  fp32 weights and optimizer states, matmuls in bf16 autocast (on a GPU)
#   bf16_kahan   bf16 weights, AdamW with Kahan summation (torch-optimi): the bits a step loses are carried over
#   bf16         bf16 weights, plain AdamW: small updates are lost (the old default; kept for comparison)
#   fp32         fp32 throughout, no autocast (GPUs without bf16)
# LoRA / QLoRA adapters always train in fp32 (fp32_master or fp32). On CPU nothing is autocast: bf16 means bf16
# weights (so they keep what they would on a GPU; torch emulates what the CPU lacks), and a LoRA base is fp32 there.
PRECISIONS = ("fp32_master", "bf16_kahan", "bf16", "fp32")


class TrainConfig(Section):
    method: Literal["lora", "qlora", "full"] = "lora"
    precision: Literal[PRECISIONS] = "fp32_master"
    lora: LoraSettings = LoraSettings()
    # accelerate config: a file, or one shipped in configs/accelerate/ by name (single, ddp, zero3, multinode).
    accelerate_config: str = "single"
    epochs: float = Field(default=2.0, gt=0)
    max_steps: int = -1  # > 0 overrides epochs
    learning_rate: float = Field(default=2e-4, gt=0)
    lr_scheduler: str = "cosine"
    warmup_ratio: float = Field(default=0.03, ge=0, lt=1)
    weight_decay: float = Field(default=0.0, ge=0)
    max_grad_norm: float = Field(default=1.0, gt=0)
    per_device_batch_size: int = Field(default=16, gt=0)
    gradient_accumulation_steps: int = Field(default=1, gt=0)
    gradient_checkpointing: bool = False
    # none: one example per row, padded. padding_free: examples concatenated with position_ids so that
    # none attends to another. wrapped: the seed's packing (examples cut into fixed blocks, cross-attending).
    packing: Literal["none", "padding_free", "wrapped"] = "padding_free"
    max_seq_length: int = Field(default=2048, gt=8)  # packed block length / truncation
    group_by_length: bool = False  # with packing none: batches of similar lengths, so little padding
    completion_only_loss: bool = True
    eval_every_steps: int | None = Field(default=None, gt=0)  # None: once per epoch
    save_every_steps: int | None = Field(default=None, gt=0)  # None: once per epoch
    save_total_limit: int = Field(default=2, gt=0)
    early_stopping_patience: int | None = Field(default=3, gt=0)  # evals without improvement
    logging_steps: int = Field(default=10, gt=0)
    seed: int = 42
    torch_compile: bool = False
    liger_kernel: bool = False
    dataloader_workers: int = Field(default=0, ge=0)
    # hub: each complete checkpoint also goes to a private Hub model repo (newest only), so that a new pod of the run
    # (a spot preemption) resumes from it; a network volume (infra.network_volume_id) keeps them instead.
    checkpoint_sync: Literal["none", "hub"] = "none"
    checkpoint_repo: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


class RLRewardWeights(Section):
    """How much each reward counts (trl sums them, weighted): finite numbers >= 0, at least one above 0."""
    execution: float = Field(default=1.0, ge=0)  # same rows as the gold query on eval's generated databases
    sql_only: float = Field(default=0.2, ge=0)  # exactly one SQL statement that parses, nothing else
    ended: float = Field(default=0.1, ge=0)  # the model ended the answer itself (not cut at max_completion_length)

    @model_validator(mode="after")
    def _some_reward_counts(self) -> "RLRewardWeights":
        if not any(getattr(self, name) > 0 for name in type(self).model_fields):
            raise ValueError("every reward weight is 0: give at least one (execution, sql_only, ended) a weight > 0")
        return self


class RLConfig(Section):
    """`t2s rl`: GRPO (trl's GRPOTrainer) with execution rewards, from the trained model (jobs/rl.py)."""
    enabled: bool = False  # whether `t2s pipeline` runs rl between train and merge (`t2s rl` always runs it)
    max_steps: int = Field(default=100, gt=0)  # optimizer steps
    group_size: int = Field(default=8, ge=2)  # completions per prompt, compared with each other (GRPO's group)
    prompts_per_step: int = Field(default=8, gt=0)  # prompts per optimizer step (x group_size completions)
    learning_rate: float = Field(default=1e-5, gt=0)
    beta: float = Field(default=0.0, ge=0)  # KL coefficient against the trained model (0: no reference model)
    temperature: float = Field(default=1.0, gt=0)  # sampling temperature of the completions
    max_completion_length: int = Field(default=128, gt=0)  # tokens; longer completions are cut (and earn no 'ended')
    reward_weights: RLRewardWeights = RLRewardWeights()
    databases_per_example: int = Field(default=2, gt=0)  # generated databases the execution reward compares on
    rows_per_table: int = Field(default=8, gt=0)
    query_timeout_s: float = Field(default=1.0, gt=0)  # per query; a completion past it earns 0
    reward_workers: int = Field(default=4, gt=0)  # sandbox worker processes scoring completions
    max_prompts: int | None = Field(default=None, gt=0)  # cap on the train rows RL draws prompts from
    save_every_steps: int = Field(default=25, gt=0)
    save_total_limit: int = Field(default=2, gt=0)
    logging_steps: int = Field(default=5, gt=0)
    seed: int = 42


class MergeConfig(Section):
    # The dtype the merged model is saved in: what users deploy. Training and the merge itself run in higher precision.
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    verify: bool = True
    verify_prompts: int = Field(default=4, gt=0)


DECODERS = ("auto", "cudagraph", "compiled", "static", "dynamic")  # eval.decoder, T2S_DECODER (jobs.lib.generate)


class EvalConfig(Section):
    split: Literal["train", "validation", "test"] = "test"
    # gguf:<quant>: a file `t2s export` made, answering through llama.cpp (greedy only)
    models: list[Literal["base", "adapter", "merged", "gguf:f16", "gguf:q8_0", "gguf:q4_k_m"]] = ["base", "merged"]
    max_examples: int | None = Field(default=None, gt=0)
    # Large batches: greedy decoding costs about the same per step at 64 rows as at 1,000 (bench/RESULTS.md).
    batch_size: int = Field(default=512, gt=0)
    max_new_tokens: int = Field(default=128, gt=0)
    # Base-model prompt variants from the seed's prompt-engineering experiment.
    prompt_variants: list[Literal["plain", "instructed", "one_shot"]] = ["plain"]
    databases_per_example: int = Field(default=3, gt=0)
    rows_per_table: int = Field(default=8, gt=0)
    query_timeout_s: float = Field(default=1.0, gt=0)
    row_limit: int = Field(default=10_000, gt=0)
    # greedy: greedy answers only. checked: each fine-tuned model is also evaluated with checked decoding (jobs.lib.checked:
    # the first of up to `candidates` answers that parses, resolves against the schema and runs), side by side with
    # its greedy answers. Base models answer greedily only: they chat, and every answer would go to the beam search.
    decoding: Literal["greedy", "checked", "vote"] = "checked"
    candidates: int = Field(default=4, ge=1)  # checked decoding: the greedy answer, then a beam search's
    # vote: as checked, and each fine-tuned model also answers by vote decoding (jobs.lib.vote): greedy plus vote_samples
    # sampled ones, run on generated databases; the largest group of equal results wins (row "<model>+vote")
    vote_samples: int = Field(default=8, ge=1)
    vote_temperature: float = Field(default=0.7, gt=0)
    # How greedy answers are decoded (jobs.lib.generate): auto is cudagraph on a GPU, transformers' generate on a CPU.
    decoder: Literal["auto", "cudagraph", "compiled", "static", "dynamic"] = "auto"


class ExportAgreement(Section):
    """The least share of the check rows on which a file run through llama.cpp answers as the merged model."""
    f16: float = Field(default=0.95, ge=0, le=1)
    q8_0: float = Field(default=0.95, ge=0, le=1)
    q4_k_m: float = Field(default=0.85, ge=0, le=1)


class ExportConfig(Section):
    """`t2s export`: GGUF files for llama.cpp / Ollama, checked against the merged model (jobs/export.py)."""
    enabled: bool = False  # whether `t2s pipeline` runs export after merge (`t2s export` always runs it)
    format: Literal["gguf"] = "gguf"
    quant: list[Literal["f16", "q8_0", "q4_k_m"]] = Field(default=["f16", "q8_0", "q4_k_m"], min_length=1)
    name: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", max_length=100)  # run_id if None
    modelfile: bool = True  # an Ollama Modelfile beside the files
    check_rows: int = Field(default=32, ge=1, le=100_000)  # the first validation rows the answers are compared on
    max_new_tokens: int = Field(default=128, gt=0)
    llama_cpp_check: bool = True  # run every file through llama.cpp (needs llama-cpp-python)
    min_agreement: ExportAgreement = ExportAgreement()
    threads: int | None = Field(default=None, gt=0)  # llama.cpp's CPU threads (None: every core)

    @model_validator(mode="before")
    @classmethod
    def _one_quant_or_several(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("quant"), str):
            return {**data, "quant": [data["quant"]]}
        return data


class PushGates(Section):
    """What the evaluated model must reach before push publishes it (the artifact's row in eval/report.json)."""
    min_sql_only: float = Field(default=0.9, ge=0, le=1)
    min_execution_accuracy: float = Field(default=0.5, ge=0, le=1)
    not_worse_than_base: bool = True  # execution accuracy at least the base model's (plain prompt)
    # The fewest rows the execution accuracy may rest on (3 rows make 66.7% out of 1 lucky answer); the eval's split
    # must also be held out (not train).
    min_rows: int = Field(default=100, ge=1, le=10**9)


class PushConfig(Section):
    repo_id: str | None = None  # "user/name"; required unless dry_run
    artifact: Literal["merged", "adapter"] = "merged"
    # Beside the model: gguf = `t2s export`'s GGUF files and Modelfile, under gguf/ (the card says how to run them)
    artifacts: list[Literal["gguf"]] = []
    private: bool = True
    dry_run: bool = False
    license: str = "apache-2.0"
    retries: int = Field(default=4, ge=0)
    timeout_s: float = Field(default=300.0, gt=0)  # how long one stalled request to the Hub may wait
    backoff_s: float = Field(default=2.0, gt=0)  # the first wait before a retry (doubled each time)
    # A model below the gates, or not evaluated, is not published unless enforce_gates is false.
    enforce_gates: bool = True
    gates: PushGates = PushGates()
    # Hardware, time and cost for the model card; filled in by infra when it launched the run.
    hardware: str | None = None
    cost_per_hour_usd: float | None = Field(default=None, ge=0)
    # Filled in by infra when it relaunched the run after a preemption or a lost pod (infra.max_recoveries): the pods
    # the run took, and what the earlier ones ran and cost.
    attempts: int = Field(default=1, ge=1)
    earlier_attempts_min: float | None = Field(default=None, ge=0)
    earlier_attempts_usd: float | None = Field(default=None, ge=0)


class Config(Section):
    # The run's folder name (runs/<run_id>): a file name, so short, and no path.
    run_id: str = Field(default="default", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", max_length=100)
    runs_dir: str = "runs"
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    rl: RLConfig = RLConfig()
    merge: MergeConfig = MergeConfig()
    export: ExportConfig = ExportConfig()
    eval: EvalConfig = EvalConfig()
    push: PushConfig = PushConfig()
    # infra/ validates its own section (RunPod settings); the jobs ignore it.
    infra: dict[str, Any] = {}

    @property
    def run_dir(self) -> Path:
        return Path(self.runs_dir) / self.run_id

    @model_validator(mode="after")
    def _examples_fit_a_training_sequence(self) -> "Config":
        # Training truncates to train.max_seq_length; prep keeps examples up to data.max_length tokens, answer last.
        if self.train.max_seq_length < self.data.max_length:
            raise ValueError(f"train.max_seq_length {self.train.max_seq_length} is shorter than data.max_length "
                             f"{self.data.max_length}, the longest example prep keeps: training would cut examples "
                             "before their answer. Raise train.max_seq_length or lower data.max_length")
        # transformers cannot quantize while it dequantizes a GGUF file: refused here, before a worker loads anything.
        if self.train.method == "qlora" and self.model.gguf_file:
            raise ValueError(f"train.method qlora cannot load the GGUF file {self.model.gguf_file} (transformers "
                             "quantizes only safetensors weights): make it a model folder first (python "
                             "bench/gguf_to_folder.py FILE.gguf DIR) and set model.name_or_path=DIR "
                             "model.gguf_file=null, or train with method lora or full")
        return self


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Defaults, then the YAML file, then `key.sub=value` overrides; validated, or one clear T2SError."""
    data: dict[str, Any] = {}
    if path is not None:
        data = read_yaml_mapping(Path(path), "config file", "e.g. --config configs/demo.yaml")
        refuse_secrets(data, f"in {path}")
    for item in overrides:
        _apply_override(data, item)
    refuse_secrets(data, "in a --set")
    for key, value in environment_overrides(os.environ).items():
        section, leaf = key.split(".")
        if isinstance(data.setdefault(section, {}), dict):  # else the file's own error is the one to say
            data[section][leaf] = value
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        error = exc.errors()[0]
        raise T2SError(describe_error(error, where_given(error["loc"], path, overrides), Config)) from None


# Environment variables that still set a config key, over the file and every --set: the key, and how the value reads.
ENVIRONMENT_KEYS = {"T2S_DECODER": "eval.decoder", "T2S_PUSH_TIMEOUT_S": "push.timeout_s",
                    "T2S_PUSH_BACKOFF_S": "push.backoff_s"}


def environment_overrides(environ) -> dict[str, Any]:
    """{config key: value} that the environment sets (ENVIRONMENT_KEYS), each said on stderr: the job's config record
    (logs/<job>.config.yaml) then holds the value it ran with. A value that cannot be one is one line."""
    found: dict[str, Any] = {}
    for name, key in ENVIRONMENT_KEYS.items():
        raw = environ.get(name, "").strip()
        if not raw:
            continue
        section, leaf = key.split(".")
        if key == "eval.decoder":
            value: Any = raw.lower()
            if value not in DECODERS:
                raise T2SError(f"{name}={value!r} is not a decoder: use one of {', '.join(DECODERS)}")
        else:
            value = _seconds(name, raw, PushConfig.model_fields[leaf].default)
        print(f"note: {name}={value} from the environment sets {key}", file=sys.stderr, flush=True)
        found[key] = value
    return found


def _seconds(name: str, raw: str, default: float) -> float:
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not (0 < value < float("inf")):
        raise T2SError(f"{name}={raw[:40]!r} is not a number of seconds above 0: set e.g. {name}={default:g}, or "
                       "unset it")
    return value


def where_given(loc: tuple, path: str | Path | None, overrides: list[str] | tuple = ()) -> str:
    """Where the key an error is about was given: the --set that names it (or a section above it), else the file."""
    key = ".".join(str(part) for part in loc)
    for item in reversed(overrides):  # the last --set of a key is the one that holds
        given = item.partition("=")[0]
        if key and (key == given or key.startswith(given + ".") or given.startswith(key + ".")):
            return f"in --set {given}"
    place = f"in {path}" if path else "in the config"
    return f"{place} with its --set overrides" if not key and overrides else place  # a rule across keys


def read_yaml_mapping(path: Path, what: str, example: str) -> dict[str, Any]:
    """A YAML file of keys and values (a run config, an accelerate config), or one line saying what is wrong with it.
    Anchors and aliases are refused: an alias loop or a few hundred bytes of nested aliases (a "billion laughs")
    would expand without bound when the config is validated or written out."""
    if not path.is_file():
        raise T2SError(f"{what} {path} not found: pass an existing YAML file, {example}")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise T2SError(f"{what} {path} is not UTF-8 text (byte {exc.start}): save it as UTF-8") from None
    except OSError as exc:
        raise T2SError(f"{what} {path} cannot be read ({exc.strerror or exc}): check its permissions") from None
    try:
        data = yaml.load(text, Loader=_YamlLoader)
    except _AliasRefused as exc:
        raise T2SError(f"{what} {path} uses a YAML alias (*{exc.anchor}) at line {exc.line}: t2s takes no anchors or "
                       "aliases (they can expand without bound); write the value out") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise T2SError(f"{what} {path} is not valid YAML{where}: fix the syntax") from None
    except RecursionError:
        raise T2SError(f"{what} {path} nests too deeply to read: a config is a few levels of keys") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise T2SError(f"{what} {path} must be a mapping of keys to values, not {type(data).__name__}")
    return data


MAX_KEY_DEPTH = 8  # levels of a --set key; the deepest real one has 3 or 4 (infra.env.NAME, push.gates.min_rows)


def _apply_override(data: dict[str, Any], item: str) -> None:
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise T2SError(f"--set {redact(repr(item))} is not key=value: write e.g. --set train.learning_rate=1e-4")
    if key.count(".") >= MAX_KEY_DEPTH:  # deeper than any key: nesting thousands of levels overflows the checks
        raise T2SError(redact(f"--set {key[:60]}...: a config key is at most {MAX_KEY_DEPTH} levels deep (e.g. "
                              "train.lora.r): fix the key"))
    node = data
    *parents, leaf = key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise T2SError(redact(f"--set {key}: {part} is not a section"))
    # YAML typing for the value, so that 1e-4 is a float and true a bool, as in the file.
    try:
        node[leaf] = yaml.load(raw, Loader=_YamlLoader)
    except (yaml.YAMLError, RecursionError):  # not YAML (or nested past reading): the text as given
        node[leaf] = raw


def refuse_secrets(data: dict[str, Any], place: str) -> None:
    """A secret in a config would be written to config.resolved.yaml, sent to the pod, uploaded with the model
    and the logs: refused, naming the key and what it looks like, never the value."""
    found = find_secret_in_config(data)
    if found is None:
        return
    where, what = found
    hint = " (a token or password? if not, break it up with '-' or '_')" if "random" in what.what else ""
    raise T2SError(f"{where} {place} holds {what.what}{hint}: secrets go in the environment or .env "
                   "(HF_TOKEN, RUNPOD_API_KEY), never in a config, a --set or infra.env")


def describe_error(error: dict[str, Any], where: str, root: type[BaseModel], prefix: str = "") -> str:
    """One line for pydantic's first error: the dotted key, where it was given, and what is wrong. `prefix` names the
    section `root` validates (infra validates its own section). Values are cut short (an error is one line) and every
    secret in the line is hidden."""
    key = ".".join([*([prefix] if prefix else []), *(str(p) for p in error["loc"])])
    kind = error["type"]
    if kind == "extra_forbidden":
        section = _section_for(root, error["loc"][:-1])
        allowed = ", ".join(section.model_fields) if section else ""
        return redact(f"unknown config key '{key}' {where}: remove it or fix the spelling (allowed here: {allowed})")
    if kind == "missing":
        return f"config key '{key}' is required {where}"
    message = error["msg"].removeprefix("Value error, ")
    if not error["loc"]:  # a rule across keys (Config's model validator): its message names them
        return redact(f"config {where}: {message}")
    if "secret" in message:  # never echo what may be one
        return f"config key '{key}' {where}: {message}"
    shown = redact(repr(error.get("input")))  # hidden before it is cut, so that no part of a secret is left
    shown = shown if len(shown) <= 80 else shown[:77] + "..."
    return redact(f"config key '{key}' {where}: {message} (got {shown})")


def _section_for(root: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    model: type[BaseModel] = root
    for part in loc:
        field = model.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    return model


class _AliasRefused(yaml.YAMLError):
    def __init__(self, anchor: str, line: int):
        super().__init__(f"alias *{anchor} at line {line}")
        self.anchor, self.line = anchor, line


class _YamlLoader(yaml.SafeLoader):
    """PyYAML follows YAML 1.1, where 1e-4 (no dot) is a string; read it as a float, as YAML 1.2 does. Aliases are
    refused (read_yaml_mapping says why)."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise _AliasRefused(event.anchor, event.start_mark.line + 1)
        return super().compose_node(parent, index)


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def names_local_path(name: str) -> bool:
    """Whether a model or dataset name is meant as a local path rather than a Hub id ("org/name")."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or name.endswith("/")


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
