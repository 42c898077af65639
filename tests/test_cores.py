"""The connector's "auto" data-plane cores inside a vLLM worker: the cores vLLM's OpenMP binding left free."""

from __future__ import annotations

from shadowserve.cores import auto_dataplane_cores, cpus_left_free, omp_bound_cpus


def test_reads_the_binding_in_each_form_vllm_sets():
    assert omp_bound_cpus({"OMP_PLACES": "{0,1,2,3}", "OMP_PROC_BIND": "true"}) == [0, 1, 2, 3]
    assert omp_bound_cpus({"OMP_PLACES": "{4},{5}"}) == [4, 5]
    assert omp_bound_cpus({"GOMP_CPU_AFFINITY": "0 1 2"}) == [0, 1, 2]
    assert omp_bound_cpus({"KMP_AFFINITY": "granularity=fine,explicit,proclist=[2,3,6]"}) == [2, 3, 6]


def test_unknown_or_absent_binding_means_no_answer():
    assert omp_bound_cpus({}) is None
    assert omp_bound_cpus({"OMP_PLACES": "cores"}) is None  # abstract names: not vLLM's form
    assert omp_bound_cpus({"OMP_PLACES": "{0:4}"}) is None  # interval notation: not read
    assert omp_bound_cpus({"GOMP_CPU_AFFINITY": "0--1"}) is None
    assert auto_dataplane_cores({}) is None


def test_free_cpus_skip_bound_cores_their_smt_siblings_and_other_nodes():
    # 2 nodes x 4 physical cores x 2 threads: cpu c and c+16 are siblings; node 0 = 0-3, 16-19.
    machine = list(range(32))

    def siblings(c):
        return [c % 16, c % 16 + 16]

    def node(c):
        return (c % 16) // 4 if (c % 16) < 8 else 9  # node 0: cores 0-3, node 1: cores 4-7, rest elsewhere

    # vLLM bound rank 0's threads to one thread per physical core, minus the reserved last core (3).
    assert cpus_left_free([0, 1, 2], machine, siblings, node) == [3, 19]


def test_a_binding_that_leaves_nothing_free_falls_back():
    assert cpus_left_free([0, 1], [0, 1], lambda c: [c], lambda c: 0) == []
