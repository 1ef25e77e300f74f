"""Prune a safetensors checkpoint larger than memory, block by block (``OsscarPruner.prune_checkpoint``).

The whole model is never loaded. The skeleton is built on the meta device (``accelerate.init_empty_weights``:
parameters on meta, buffers such as rotary ``inv_freq`` real) from the folder's ``config.json``; the weights
outside the decoder blocks (embeddings, positions, final norm, LM head) are loaded to capture every block's
calibration inputs, written to the first output shard and dropped again. Then, for each block in turn, its
tensors are read from the shards (``safe_open(...).get_tensor`` through the index's ``weight_map``), the block
is materialised (``load_state_dict(..., assign=True)``), pruned by the same code as the in-memory loop
(:class:`osscar_hf.pipeline.BlockStream`), written to its own output shard and moved back to meta. Peak host
memory is about the calibration activations plus one block (plus the non-block weights during the capture).

The output folder is a complete checkpoint (shards, ``model.safetensors.index.json``, ``config.json`` in the
stock format when it expresses the pruned shapes and in the osscar format otherwise, tokenizer files,
``generation_config.json``, ``osscar_report.json``, a ``README.md`` model card), built in a hidden folder beside
the target (``.NAME.osscar-partial``) and renamed into place at the end.

Resuming: after every block, its shard is fsynced and ``osscar_progress.json`` in that folder records the
finished blocks (their reports, shards and tensor names) and a fingerprint of everything the output depends on
(source path, the source files' sizes and mtimes, the pruning settings, the SHA-256 of the calibration windows,
the compute device, library versions). An interrupted run keeps the folder; the same call then captures the
calibration inputs again, recomputes the inputs of the first unfinished block by running the finished blocks
once more (the pruned block read back from its shard and/or the dense one from the source, exactly as the loop
computed them; nothing is solved again), and goes on: the checkpoint is the one an uninterrupted run writes. A
finished block whose shard is missing or unreadable is pruned again; a different fingerprint raises
:class:`ResumeError` unless ``resume=False`` (start over). Config fields named in
``OsscarConfig.RESULT_NEUTRAL_FIELDS`` are left out of the fingerprint: they do not change the result.

Hub ids (:class:`HubFiles`): the revision is resolved to a commit once (``model_info(files_metadata=True)``,
which also gives every file's size and blob id), and every file is then read from that commit through the
huggingface_hub cache: ``config.json``, the index, ``generation_config.json`` and the tokenizer files at the
start; shard headers (to check every tensor's name and shape before any work) by HTTP range requests, without
downloading the shards; each shard when a block, or the non-block weights, first reads from it. A file already
in the cache is not downloaded again, so a resumed run downloads only the shards the interrupted one had not.
The fingerprint records the repository, the commit and the files' sizes and blob ids (LFS sha256): a resume
after the revision moved to another commit is refused, with the ``revision=`` that finishes the interrupted run.

``delete_downloaded_shards=True`` deletes a shard from the cache as soon as the last block that reads it is done,
so a checkpoint can be pruned on a disk that cannot hold the dense and pruned models whole. Only files this run
downloaded are deleted (blob and snapshot link; a file that was in the cache before the run is never touched,
nor anything outside the cache); the list is kept in the partial folder, so a rerun after an interruption
deletes the shards the interrupted run downloaded as well. Config, index and tokenizer files stay cached. Do not
share a cache between concurrent runs of the same repository with this option: one could delete a shard the
other is about to read. Local source files are never deleted.

One run per output folder: while a run works it holds an exclusive ``fcntl.flock`` on ``.NAME.osscar-lock``
beside the target (taken before the partial folder is touched, with the holder's pid, host, start time and
source written in it). A second run into the same target raises :class:`ConcurrentRunError` at once, naming
them. The lock dies with its process, so a lock file left by a killed run does not block the next one; a run
removes the file when it ends, also by an error.
"""

from .lock import ConcurrentRunError, lock_file, run_lock
from .resume import PROGRESS_NAME, ResumeError, partial_folder
from .run import REPORT_NAME, prune_checkpoint
from .sources import (
    GENERATION_CONFIG_NAME,
    INDEX_NAME,
    SINGLE_NAME,
    TOKENIZER_FILES,
    CheckpointError,
    HubFiles,
    LocalFiles,
    ShardReader,
    open_source,
)

__all__ = [
    "GENERATION_CONFIG_NAME", "INDEX_NAME", "PROGRESS_NAME", "REPORT_NAME", "SINGLE_NAME", "TOKENIZER_FILES",
    "CheckpointError", "ConcurrentRunError", "HubFiles", "LocalFiles", "ResumeError", "ShardReader", "lock_file",
    "open_source", "partial_folder", "prune_checkpoint", "run_lock",
]
