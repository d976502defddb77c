"""The thread ledger's arithmetic (steps/training/threads.py): who may use how many CPU threads as runs finish."""

from steps.training.threads import Ledger


def test_a_finished_workers_threads_go_to_its_unfinished_neighbours_on_the_same_node():
    ledger = Ledger()
    assert ledger.join("top[0]", "node-a", 1) == 1
    assert ledger.join("bottom[0]", "node-a", 1) == 1
    assert ledger.join("bottom[1]", "node-b", 2) == 2
    ledger.leave("top[0]")
    assert ledger.threads("bottom[0]") == 2  # its own and the top's
    assert ledger.threads("bottom[1]") == 2  # another node: nothing freed there
    assert ledger.threads("top[0]") == 1  # a finished worker keeps asking for its own only


def test_freed_threads_are_split_evenly_and_add_up():
    ledger = Ledger()
    for key, own in (("a[0]", 3), ("b[0]", 1), ("c[0]", 1), ("d[0]", 2)):
        ledger.join(key, "node", own)
    ledger.leave("a[0]")  # 3 threads among three workers
    assert [ledger.threads(k) for k in ("b[0]", "c[0]", "d[0]")] == [2, 2, 3]
    ledger.leave("d[0]")  # 5 freed among two: the remainder to the first by key
    assert [ledger.threads(k) for k in ("b[0]", "c[0]")] == [4, 3]
    assert sum(ledger.threads(k) for k in ("b[0]", "c[0]")) == 3 + 1 + 1 + 2


def test_a_restarted_worker_joins_again_and_takes_its_threads_back():
    ledger = Ledger()
    ledger.join("top[0]", "node", 1)
    ledger.join("bottom[0]", "node", 1)
    ledger.leave("bottom[0]")
    assert ledger.threads("top[0]") == 2
    assert ledger.join("bottom[0]", "node", 1) == 1  # a restarted worker: unfinished again
    assert ledger.threads("top[0]") == 1
    ledger.leave("unknown[0]")  # a worker the ledger never saw (it joined a ledger that was restarted): ignored
    assert ledger.threads("top[0]") == 1
