# Shared by the row and sweep scripts (source it): result files grow one seed at a time, so a
# run's result outlives runs/, which may be wiped between sessions; commit them as they come.
R=benchmarks/results
recorded() {  # result-name seed config [--set ...]: 0 if the seed is in the result file (same configuration)
  local rc=0
  python benchmarks/has_seed.py "$R/$1.json" "$2" --config "$3" "${@:4}" || rc=$?
  [ $rc = 2 ] && exit 2  # the file holds another configuration: has_seed.py said which
  return $rc
}
add_seed() {  # result-name run-folder: the finished run joins the seeds already in the result file
  local earlier=()
  [ -f "$R/$1.json" ] && earlier=(--earlier "$R/$1.json")
  perseq bench collect --name "$1" "${earlier[@]}" "$2"
}
