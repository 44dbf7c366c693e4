-- Schema 9: every row of a page can be marked without leaving it. Nothing about the rows
-- changes.
--
-- A mark is a HOT update (no index entry, ~160 bytes of WAL) only when the row's new
-- version fits in its page. Schema 5 filled pages to 60 %: the 40 % left holds new
-- versions of two thirds of a page's rows, and the old versions are pruned (their room
-- given back) only by a statement that reads the page after the marking transaction has
-- ended. A relay that drains fast marks all the rows of a page in one statement; the
-- page's last rows then move to another page, with a new entry in every index (the
-- bench's Kafka drains: 86-93 % HOT, 204-271 bytes of WAL per row). Filled to 50 %, a
-- page has room for a new version of each of its rows, whatever their size (a
-- server-side loop marking 100 000 preloaded rows 500 ids per statement, 2026-12-07:
-- fillfactor 60 gave 72 % HOT and 327 bytes of WAL per row, 50 gave 100 % and 112 bytes;
-- docs/write-path.md §9).
--
-- Pages filled from now on take half their room; pages written before keep their rows.
-- Cost: the table takes ~1.2 times the pages of schema 5 until retention deletes rows.
--
-- One statement: a SHARE UPDATE EXCLUSIVE lock (producers and relays go on), no table
-- read, no index built.
ALTER TABLE outbox SET (fillfactor = 50);

COMMENT ON TABLE outbox IS 'relay schema 9';
