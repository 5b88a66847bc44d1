"""The pieces every tiny random-weight checkpoint is built from (`tiny`, `tiny_qwen_image_21`, `tiny_controlnet`):
the trained byte-level BPE behind every tiny Qwen tokenizer and its added tokens, the seeded weight draw, and
Qwen's flow-match scheduler. Apart from `tiny` so that the per-family builders import them without importing
the family table's builder (no import cycle)."""

from __future__ import annotations

import functools
import inspect
import json
import math
import re
from collections.abc import Callable

import torch
from diffusers import (
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    QwenImageEditPipeline,
    QwenImageEditPlusPipeline,
    QwenImagePipeline,
)
from tokenizers import AddedToken, Regex, Tokenizer, normalizers, pre_tokenizers, trainers
from tokenizers.models import BPE
from torch import nn
from transformers import Qwen2Tokenizer
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

TARGET_VOCAB = 900

# --- tokenizer ----------------------------------------------------------------------------------------------------
# Added tokens in Qwen's id order (they follow the BPE vocabulary). True = special (skipped when decoding).
_QWEN25_ADDED = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
)
_QWEN3_ADDED = _QWEN25_ADDED + (
    ("<tool_response>", False),
    ("</tool_response>", False),
    ("<think>", False),
    ("</think>", False),
)

# Minimal Qwen3-style chat template: string contents, generation prompt, and the enable_thinking switch
# (False pre-fills an empty think block, as the real Qwen3 template does).
QWEN3_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}"
    "{{- '<think>\\n\\n</think>\\n\\n' -}}"
    "{%- endif -%}"
    "{%- endif -%}"
)

# Everyday caption vocabulary so ordinary prompts get word-sized tokens; anything else falls back to bytes.
_ENGLISH = """
a an the of in on at to from with without by for and or but not no yes is are was be this that these those it its
red orange yellow green blue purple pink brown black white gray grey golden silver dark light bright pale colorful
fox cat dog horse bird fish owl wolf bear lion tiger rabbit deer cow sheep duck eagle butterfly dragon robot person
man woman child girl boy people face hair eyes hand smile portrait astronaut knight wizard chef farmer
snow rain sun moon star stars sky cloud clouds fog storm sunset sunrise night day morning evening winter summer
mountain mountains river lake sea ocean beach island forest tree trees flower flowers garden field grass desert
city street road bridge house castle tower building room kitchen window door table chair book lamp car train boat
photo photograph painting drawing sketch illustration poster cartoon anime watercolor oil render cinematic
realistic detailed sharp soft blurry high quality style lighting shadow background foreground center left right
top bottom small large big tiny huge tall short long round square old new young happy sad quiet
sitting standing running walking flying swimming sleeping holding looking wearing reading playing eating
hat coat dress shirt glasses umbrella cup coffee tea bread apple cake pizza sign logo words letter letters
change make turn add remove replace keep put into over under behind front next near far above below inside
one two three four five six seven eight nine ten first second picture pictures image images scene view
"""


def _template_chunks() -> list[str]:
    """Literal text of the diffusers prompt templates (and the Z-Image chat frame), split at special tokens."""
    pipelines = (
        _bare_pipeline(QwenImagePipeline),
        _bare_pipeline(QwenImageEditPipeline),
        _bare_pipeline(QwenImageEditPlusPipeline),
    )
    texts = [p.prompt_template_encode.replace("{}", "") for p in pipelines]
    texts += ["Picture 1: Picture 2: Picture 3: ", "system\nuser\nassistant\n"]
    return [chunk for text in texts for chunk in re.split(r"<\|[a-z_]+\|>", text) if chunk]


def _bare_pipeline(cls: type[DiffusionPipeline]) -> DiffusionPipeline:
    """A component-less pipeline, only to read the template attributes the real __init__ sets."""
    names = [name for name in inspect.signature(cls.__init__).parameters if name != "self"]
    return cls(**dict.fromkeys(names, None))


@functools.cache
def _trained_bpe() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte-level BPE with Qwen2's pre-tokenizer. The templates are weighted far above everything else, so each of
    their pre-tokens merges into one token and the hard-coded drop counts (34 / 64) hold."""
    tok = Tokenizer(BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=TARGET_VOCAB - len(_QWEN3_ADDED),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: any text tokenizes
        show_progress=False,
    )
    words = _ENGLISH.split()
    corpus = _template_chunks() * 1000 + [" ".join(words)] * 10 + [w.capitalize() for w in words]
    tok.train_from_iterator(corpus, trainer=trainer)
    vocab = dict(sorted(tok.get_vocab().items(), key=lambda kv: kv[1]))
    merges = [tuple(pair) for pair in json.loads(tok.to_str())["model"]["merges"]]
    return vocab, merges


def _make_tokenizer(added: tuple[tuple[str, bool], ...], chat_template: str | None = None) -> Qwen2Tokenizer:
    """A fresh Qwen2Tokenizer on the trained BPE (never shared between pipelines: saving the Edit processor
    rewrites its tokenizer's settings)."""
    vocab, merges = _trained_bpe()
    tok = Qwen2Tokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=131072)
    # Insert in Qwen order so ids follow the BPE vocabulary exactly as in the real files.
    for text, special in added:
        token = AddedToken(text, special=special, normalized=False)
        if special:
            tok.add_special_tokens({"extra_special_tokens": [token]}, replace_extra_special_tokens=False)
        else:
            tok.add_tokens([token])
    tok.eos_token = "<|im_end|>"
    tok.pad_token = "<|endoftext|>"
    if chat_template is not None:
        tok.chat_template = chat_template
    _check_added_ids(tok, vocab, added)
    return tok


def _check_added_ids(tok: Qwen2Tokenizer, vocab: dict[str, int], added: tuple[tuple[str, bool], ...]) -> None:
    for offset, (text, _) in enumerate(added):
        if tok.convert_tokens_to_ids(text) != len(vocab) + offset:
            raise RuntimeError(f"added token {text!r} did not get Qwen's id order")


# --- weight init --------------------------------------------------------------------------------------------------
_CONV_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
# Query/key RMSNorm scales (diffusers norm_q / norm_added_k, Qwen3 q_norm / k_norm). Scales around 1 leave attention
# almost uniform, so the ~10 prompt tokens among ~8000 Edit-Plus condition tokens barely register (the prompt moved
# the image by < 1e-3); 1.5 sharpens attention, as trained models are, and lifts that to ~2e-2.
QK_NORM_MEAN = 1.5
_QK_NORM = re.compile(r"(^|\.)(norm_(added_)?[qk]|[qk]_norm)\.weight$")


def _randn_(param: nn.Parameter, gen: torch.Generator, std: float, mean: float = 0.0) -> None:
    param.data.copy_(torch.randn(param.shape, generator=gen, dtype=torch.float32) * std + mean)


@torch.no_grad()
def randomise_weights_(model: nn.Module, seed: int) -> None:
    """Redraw every parameter from a generator seeded with ``seed``: Linear/Conv weights N(0, 1/fan_in),
    embeddings N(0, 1), learned pad tokens N(0, 1); constructor constants (norm scales = 1, biases = 0) get
    +-0.1 noise so that nothing hides behind an exact 0 or 1 (query/key norm scales are centred on QK_NORM_MEAN)."""
    gen = torch.Generator().manual_seed(seed)
    done: set[int] = set()
    for module in model.modules():
        if isinstance(module, _CONV_TYPES):
            _randn_(module.weight, gen, 1.0 / math.sqrt(module.weight[0].numel()))
            done.add(id(module.weight))
        elif isinstance(module, nn.Embedding):
            _randn_(module.weight, gen, 1.0)
            done.add(id(module.weight))
    for name, param in model.named_parameters():
        if id(param) in done:
            continue
        if name.endswith("pad_token"):
            _randn_(param, gen, 1.0)
        elif name.endswith("bias") or bool((param == 0).all()):
            _randn_(param, gen, 0.1)
        elif bool((param == 1).all()):
            _randn_(param, gen, 0.1, mean=QK_NORM_MEAN if _QK_NORM.search(name) else 1.0)
        else:
            raise RuntimeError(f"{type(model).__name__}.{name}: unexpected constructor init, extend the rules")


def _seeded(seed: int, offset: int, build: Callable[[], nn.Module]) -> nn.Module:
    """Construct under a fixed global seed (constructors draw from it) without disturbing the caller's RNG,
    then redraw all weights from a per-component generator."""
    component_seed = seed * 1000 + offset
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(component_seed)
        model = build()
    randomise_weights_(model, component_seed)
    return model.eval()


# --- scheduler --------------------------------------------------------------------------------------------------------
def _qwen_scheduler() -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=1.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=0.9,
        base_image_seq_len=256,
        max_image_seq_len=8192,
        time_shift_type="exponential",
        shift_terminal=0.02,
    )
