"""The bottom layer: what every stage shares and nothing depends on torch.

Errors, hashing, atomic writes, the run folder and release layout (every file
name, named once), the recipe and its typed sections, the stages as data, the
data manifest, Merkle trees and document templates. Every other package
imports from here; this package imports from none of them.
"""
