"""gin config files (a package so gin can resolve `include` paths from any directory)."""
