"""Clients of a running deployment: submit documents and fine-tune jobs, follow their results."""
