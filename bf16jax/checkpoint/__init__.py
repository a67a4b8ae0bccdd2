"""Checkpoints: the Orbax store of a train state, its integrity checks and its directory.

Owns `Checkpointer` (Orbax CheckpointManager with the train state, data position and
checksums), the checksum manifest and its verification, and the checkpoint directory's
quarantine for damaged steps. Knows nothing about how a state is trained.
May import: precision, parallel.
"""
