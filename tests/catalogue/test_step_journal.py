"""Returned steps kept in the database (jobyard.job_engine.db.steps): concurrent saves share
commits, every one is durable when save returns, a second save of a step keeps the first
result, and a database that cannot take them makes save say so rather than fail the step."""

from __future__ import annotations

import threading

from jobyard.job_engine.db.steps import StepJournal, load_steps


def test_concurrent_saves_are_all_committed_when_they_return(database: str) -> None:
    journal = StepJournal(database)
    results: list[bool] = []

    def steps(job: int) -> None:
        results.extend(journal.save(f"job-{job}", f"s{k}", f'{{"k": {k}}}') for k in range(20))

    threads = [threading.Thread(target=steps, args=(job,)) for job in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [True] * 160
    kept = load_steps([f"job-{job}" for job in range(8)], url=database)
    assert {len(s) for s in kept.values()} == {20} and kept["job-3"]["s7"] == '{"k": 7}'
    assert journal.save("job-3", "s7", '{"k": "again"}')
    assert load_steps(["job-3"], url=database)["job-3"]["s7"] == '{"k": 7}'


def test_a_database_without_the_table_is_reported_not_raised(tmp_path) -> None:
    journal = StepJournal(f"sqlite:///{tmp_path / 'unmigrated.db'}")
    assert journal.save("job", "s0", "1") is False
    assert journal.save("job", "s1", "1") is False  # and the writer keeps going


def test_a_large_batch_with_a_step_twice_keeps_every_row_and_the_first_result(
    database: str,
) -> None:
    """Rows handed over faster than one commit go in one batch: more rows than one INSERT
    statement takes (250), and a step saved twice within it, keep every row and the first
    result."""
    journal = StepJournal(database)
    waits = [journal.begin("big", f"s{k}", str(k)) for k in range(600)]
    waits.append(journal.begin("big", "s599", '"second"'))
    assert [wait() for wait in waits] == [True] * 601
    kept = load_steps(["big"], url=database)["big"]
    assert len(kept) == 600 and kept["s0"] == "0" and kept["s599"] == "599"
    assert [wait() for wait in waits[:3]] == [True] * 3  # a second wait answers as the first
