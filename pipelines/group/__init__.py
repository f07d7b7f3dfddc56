"""Group level: subjects' maps in a common space, statistics across subjects, ROI summaries, inter-subject ceilings."""
