"""The syntax of the ``data`` setting, in words (a leaf module: the CLI's help and the parser share it)."""

HINT = "wikitext, teacher, file:PATH, jsonl:PATH:FIELD, hf:NAME[:CONFIG]:SPLIT:FIELD (mix with @WEIGHT, e.g. teacher@0.5,wikitext@0.5)"

SPEC_HELP = """\
SPEC: items separated by commas, each SOURCE[:ARGS][@WEIGHT]:
  wikitext                                    WikiText-2 validation (the default)
  teacher                                     text sampled from the original model (generated once, cached)
  teacher:tokens=80000:seed=1                 a source's settings as key=value, colon-separated
  file:notes/*.md  file:corpus/  notes.txt    UTF-8 file, directory or glob (an existing path alone works)
  jsonl:data.jsonl:text                       the 'text' field of each JSON line (field defaults to text)
  hf:wikitext:wikitext-103-raw-v1:train:text  a hub dataset NAME[:CONFIG]:SPLIT:FIELD (online, `datasets`)
  teacher@0.5,wikitext@0.5                    a mix: weights are shares of the windows (normalised)
teacher settings: tokens (40000), max_new_tokens (256), min_new_tokens (16), batch_size (16),
temperature (1.0), top_k (0 = all), prompts (mixed | bos | text | chat), seed (0), dtype (bfloat16).
"""
