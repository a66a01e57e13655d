"""Data layer: named datasets and own files, tokenisation, windowing, packing, masking, batches.

Datasets: named conll2003, brown_pos (token classification), sst2 (classification), text:<corpus>
(brown, shakespeare, conll2003, sst2); or own files (lib.data.own): conll:<folder|file>,
tsv:/csv:/jsonl:<folder|file>, text:<file|folder>. Token-classification labels are IOB2.

Batch specs (numpy dicts, int32, fixed batch size B; T is a bucket length <= max_len):
  token classification: input_ids, input_mask, token_type_ids, labels (B, T), labels -1 = ignored;
    example_ids (B,) (sentence index in the split, -1 = dummy row); evaluation adds word_ids (B, T)
    (word index at each word's first sub-word, else -1) and predict_mask (B, T) (1 where this
    window owns the word's prediction), and puts labels only where predict_mask is 1. Packed
    training (pack_rows = R > 0): (R, max_len) rows of windows laid end to end, with segment_ids
    and position_ids as packed LM rows and no example_ids.
  classification: input_ids, input_mask, token_type_ids (B, T) (sentence pairs: 0 for the first
    text, 1 for the second), label (B,), example_ids (B,). Packed training (pack_rows = R): (R,
    max_len) rows with segment_ids and position_ids, label (R, S) (-1 on empty slots) and
    pool_positions (R, S) (each example's first token), S = max_len // the shortest example.
  packed LM (text:*): input_ids, input_mask, segment_ids (0 = pad, 1.. per segment), position_ids
    (restart per segment), labels (B, T): MLM = original id where corrupted else -1; CLM = next
    token in the same segment, -1 at a segment's last token and on padding.
"""

from lib.data.builders import (DATASETS, DEFAULT_CACHE_DIR, DEFAULT_DATA_DIR, get_builder,
                               ner_label_names, pos_label_names)
from lib.data.masking import mask_tokens
from lib.data.own import PAIR_SEPARATOR
from lib.data.packing import attention_mask, next_token_labels, pack_stream
from lib.data.pipeline import (CONFIG_DEFAULTS, BatchIterator, config_kwargs, from_config,
                               lm_batches, make_batches, padding_stats, read_gold, read_shard,
                               seq_cls_batches, shard_range, source_of, token_cls_batches)
from lib.data.readers import DataFormatError, brown_split
from lib.data.sources import Source, label_names_of, load_split, task_of
from lib.data.tokenize import plan_windows, window_owners, windows_for_sentence

