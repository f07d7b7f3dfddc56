"""Published encoding models and what consumers do with them.

- :mod:`.weights`: the ridge weights and intercepts of a fit (the fold that made the held-out scores);
- :mod:`.export`: the safetensors file and feature recipe per subject and feature space (``publish.models``);
- :mod:`.methods`: the manifest's ``methods`` (how every number was made);
- :mod:`.predict`: a new stimulus in, predicted time courses and maps out (``neuroflow predict``);
- :mod:`.insilico`: contrasts of sentence sets and selection of driving / suppressing sentences.

``pipelines.predict``, ``pipelines.contrast`` and ``pipelines.select_sentences`` are the entry points.
"""
