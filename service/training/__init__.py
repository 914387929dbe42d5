"""Training the shipped models on real offline data (`seqserve train`).

`text_task` trains a byte-level LM on Python standard-library source (`text_corpus`);
`series_task` trains a next-week forecaster on the Mauna Loa CO2 series (`co2_series`), with
its standardisation folded into the weights (`normalization`). `trainer` holds what both share.
"""

from service.training.series_task import train_series
from service.training.text_task import train_text
from service.training.trainer import TrainOptions, TrainResult

__all__ = ["TrainOptions", "TrainResult", "train_series", "train_text"]
