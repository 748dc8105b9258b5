-- A reply a taker took over is marked, so the taker can find it again: if the
-- answer to its takeover statement was lost (the statement ran, the connection
-- broke), the next takeover returns it once more instead of leaving it in
-- flight forever under an owner that does not know it holds it.
ALTER TABLE replies_in_flight ADD COLUMN taken boolean NOT NULL DEFAULT false;
