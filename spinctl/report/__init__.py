"""`spinctl report`: a static report of one patch (Markdown summary, PNG plots) and its model-card section.

inputs: read and cross-check the files; evals: eval results as before/after measurements;
markdown: the summary text; plots: the PNGs (matplotlib, optional); card: the README section;
write: the report directory; terminal: the rich tables.
"""
