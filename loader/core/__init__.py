"""The loader's core: the loop that loads a page source into the memory file, and
what it is made of.

One module per part (docs/DESIGN.md has a row for each): the loader and its public
records, the reads, verification against checksums, the window over the source's
extents, settling loaded memory and answering waiters, the scheduling loop; below
them the range sets, the layout, the extent sources, the sweep orders, working sets,
statistics, and :class:`PageService`, the seam the front ends see.  Nothing is
re-exported here: :mod:`loader` exports the public names.
"""
