"""The pure clinical core: facts from the record, the ACR scenario, the rating of each order.

Nothing here does I/O or reads a clock: the evaluation time is always passed in.
"""
