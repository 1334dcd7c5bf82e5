"""Graph passes on torch.fx / torch.export graphs: trace, adapt the output, profile, place exits, split.

``trace_model`` -> ``prepare_graph`` (logits only) -> ``profile_graph`` (shapes and FLOPs per
node) -> ``find_candidates`` / ``select_exit_points`` -> ``split_stages`` (stages carrying every
live value). Nothing here knows about heads, bundles or data.
"""
