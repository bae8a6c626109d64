-- How many ids a paged index (_lib.lua) holds, KEYS[1]: its pages' and a
-- legacy index's (kept whole by a version before; an id moved from it is in
-- one or the other).
return aq_pages_size(KEYS[1])
