"""Label refinement: weak classifiers cross-fitted per store, the vote and Dawid-Skene aggregators, the refine stage's decisions."""
