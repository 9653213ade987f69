"""OpenMoE's pretraining tasks and mixtures names and weights unchanged
(XueFuzhao/text-to-text-transfer-transformer `t5/data/tasks.py`, `t5/data/mixtures.py`).

Tasks: `redpajama_{c4,wikipedia,stackexchange,arxiv,github,book,common_crawl}_{ul2,full_lm}`,
`wikipedia_{ul2,full_lm}`, `the_stack_dedup_{ul2,full_lm}`; vocabulary umT5 + 300 sentinels
(path from gin, see `openmoe_jax.vocab`). Mixtures use OpenMoE's raw weights with
`default_rate=1.`: `mix_ul2` (Base / 8B stage 1), `mix_ul2_stage2` / `mix_full_lm_stage2`
(8B after ~780B tokens), `mix_ul2_v2` / `mix_full_lm_v2` (34B). Sources resolve lazily, see
`tasks.sources`.
"""
import functools

from openmoe_jax.data import vocab
from tasks import common
from tasks import sources

REDPAJAMA_SUBSETS = ("c4", "wikipedia", "stackexchange", "arxiv", "github", "book",
                     "common_crawl")
_JSONL = ("*.jsonl", "*.jsonl.gz", "*.jsonl.zst", "*.json.gz")

# Percent of examples per subset: the raw weights of XueFuzhao/text-to-text-transfer-transformer `t5/data/mixtures.py` (paper
# Table 1), normalised by seqio.
MIXTURE_WEIGHTS = {
    "v1": {"redpajama_c4": 15.0, "redpajama_wikipedia": 4.5, "redpajama_stackexchange": 2.0,
           "redpajama_arxiv": 2.5, "redpajama_book": 4.5, "redpajama_github": 4.5,
           "redpajama_common_crawl": 67.0, "the_stack_dedup": 100.0},
    "stage2": {"redpajama_c4": 15.0, "redpajama_wikipedia": 6.5, "wikipedia": 6.5,
               "redpajama_stackexchange": 2.5, "redpajama_arxiv": 4.5, "redpajama_book": 6.5,
               "redpajama_github": 5.0, "redpajama_common_crawl": 43.5,
               "the_stack_dedup": 10.0},
    "v2": {"redpajama_c4": 15.0, "redpajama_wikipedia": 4.5, "wikipedia": 2.5,
           "redpajama_stackexchange": 1.0, "redpajama_arxiv": 4.5, "redpajama_book": 4.5,
           "redpajama_github": 5.0, "redpajama_common_crawl": 33.0, "the_stack_dedup": 30.0},
}
MIXTURES = {  # mixture name -> (weights, objective)
    "mix_ul2": ("v1", "ul2"),
    "mix_ul2_stage2": ("stage2", "ul2"),
    "mix_full_lm_stage2": ("stage2", "full_lm"),
    "mix_ul2_v2": ("v2", "ul2"),
    "mix_full_lm_v2": ("v2", "full_lm"),
}


def _source_factories() -> dict:
  """Task prefix -> zero-argument factory of its (deferred) source."""
  def deferred(splits, **kwargs):
    build = functools.partial(sources.file_or_tfds_source, splits=splits, **kwargs)
    return lambda: sources.DeferredSource(build, splits=tuple(splits))

  factories = {}
  for subset in REDPAJAMA_SUBSETS:
    # Only C4 had a validation split in OpenMoE: the last 2000 training documents, held out
    # (train[:-2000], XueFuzhao/text-to-text-transfer-transformer `t5/data/tasks.py`).
    splits = {"train": "train[:-2000]", "validation": "train[-2000:]"} if subset == "c4" else {
        "train": "train"}
    factories[f"redpajama_{subset}"] = deferred(
        splits, name=f"redpajama_{subset}", raw_dir_attr="redpajama_dir", subdir=subset,
        patterns=_JSONL, tfds_name=f"redpajama_{subset}:1.0.0", text_key="text")
  factories["wikipedia"] = deferred(
      {"train": "train"}, name="wikipedia", raw_dir_attr="wikipedia_dir", subdir="",
      patterns=_JSONL + ("*.txt",), tfds_name="wikipedia/20190301.en:1.0.0", text_key="text")
  factories["the_stack_dedup"] = deferred(
      {"train": "train"}, name="the_stack_dedup", raw_dir_attr="the_stack_dir", subdir="",
      patterns=("*.parquet",), tfds_name="the_stack_dedup:1.0.0", text_key="text",
      field="content")
  return factories


def register() -> None:
  """Registers all OpenMoE tasks and mixtures (idempotent, touches no data)."""
  vocabulary = vocab.openmoe_vocabulary()
  for prefix, make_source in _source_factories().items():
    common.add_task_pair(prefix, make_source, vocabulary)
  for mixture, (weights, objective) in MIXTURES.items():
    common.add_mixture(mixture, [(f"{prefix}_{objective}", rate)
                                 for prefix, rate in MIXTURE_WEIGHTS[weights].items()])


register()
