"""Loading real data sets into tensors, and the samples that ship with potstill (licences beside them)."""

from pathlib import Path

#: Shakespeare (public domain): the default text of the causal-LM task and of influence calibration
VENDORED_TEXT = Path(__file__).parent / "text" / "shakespeare-sample.txt"
#: 2,000 sentence-polarity sentences (CC BY 4.0): the default data of the sentence-embedding task
VENDORED_SENTENCES = Path(__file__).parent / "text" / "sentence-polarity-sample.txt"
#: six LJ Speech sentences (public domain): ``wavs/*.flac`` and their ``metadata.csv`` lines
VENDORED_LJSPEECH = Path(__file__).parent / "speech" / "ljspeech"
#: the digits 0-9 of one FSDD speaker (CC BY-SA 4.0): ``recordings/{digit}_{speaker}_{idx}.wav``
VENDORED_FSDD = Path(__file__).parent / "speech" / "fsdd"
#: a State of the Union address (public domain): held-out text of another domain for LM runs
VENDORED_OUT_OF_DOMAIN = Path(__file__).parent / "text" / "state-of-the-union-2005.txt"
