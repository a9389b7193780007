"""Conversation files -> validated conversations -> ChatML ids/labels -> packed batches."""
