DROP TABLE limit_places;
DROP TABLE limits;
