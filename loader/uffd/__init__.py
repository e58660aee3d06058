"""userfaultfd front ends: Firecracker's page-fault handler mode and the zero-copy
(MINOR fault) mode (docs/UFFD.md).

The package imports nothing itself: its modules are imported by name
(``loader.uffd._handler``, ...), so that importing one of them (the server imports
the zero-copy mode) never runs the others.
"""
