# Runs mpi_timeout_driver under mpirun -np 2 and checks that the job fails (non-zero exit) with the
# timeout message, well before the hung rank's own 30 s timeout.
# Inputs: MPIEXEC, MPI_ARGS (list), DRIVER.
string(TIMESTAMP t0 "%s")
execute_process(COMMAND ${MPIEXEC} ${MPI_ARGS} -np 2 ${DRIVER}
                RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err TIMEOUT 50)
string(TIMESTAMP t1 "%s")
math(EXPR elapsed "${t1} - ${t0}")
set(all "${out}${err}")
message(STATUS "mpirun exit: ${rc}, ${elapsed} s\n${all}")
if(rc STREQUAL "0")
  message(FATAL_ERROR "the job exited 0; expected a non-zero exit after the timeout")
endif()
string(FIND "${all}" "all_reduce_sum timed out after 1000 ms on MPI rank 0 of 2" pos)
if(pos EQUAL -1)
  message(FATAL_ERROR "the timeout message is missing from the job's output")
endif()
if(elapsed GREATER 20)
  message(FATAL_ERROR "the job took ${elapsed} s: mpirun did not end it when rank 0 failed")
endif()
