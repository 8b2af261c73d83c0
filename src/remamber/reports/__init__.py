"""Reports from evaluation outputs only: Tables 1-4 (LaTeX + CSV) and the paper's figures.

Import the submodules directly (``remamber.reports.tables``, ``remamber.reports.figures``); this
package imports nothing eagerly so that table rendering never loads matplotlib.
"""
