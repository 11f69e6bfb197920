# CUDA architectures: the default list for an nvcc version, and a probe of what nvcc really builds.
# Included by CMakeLists.txt; tests/test_build.py runs fastppo_default_cuda_architectures with cmake -P.

# The architectures each CUDA release can build: 12.8 added Blackwell (100, 120), 13.0 dropped
# everything below Turing (75). The last entry also embeds PTX for newer GPUs.
function(fastppo_default_cuda_architectures version out)
  if(version VERSION_GREATER_EQUAL 13.0)
    set(archs "75-real;80-real;86-real;89-real;90-real;100-real;120")
  elseif(version VERSION_GREATER_EQUAL 12.8)
    set(archs "70-real;75-real;80-real;86-real;89-real;90-real;100-real;120")
  elseif(version VERSION_GREATER_EQUAL 11.8)
    set(archs "70-real;75-real;80-real;86-real;89-real;90")
  elseif(version VERSION_GREATER_EQUAL 11.1)
    set(archs "70-real;75-real;80-real;86")
  else()
    set(archs "")
  endif()
  set(${out} "${archs}" PARENT_SCOPE)
endfunction()

# Whether nvcc builds a small kernel over fastppo's CUDA headers for `archs`.
function(fastppo_cuda_probe archs out)
  string(MAKE_C_IDENTIFIER "${archs}" tag)
  set(CMAKE_CUDA_ARCHITECTURES "${archs}")  # try_compile hands the caller's value to the test project
  # The result is cached under a name per list (try_compile caches it), so a reconfigure does not probe again.
  try_compile(FASTPPO_CUDA_PROBE_${tag} ${CMAKE_CURRENT_BINARY_DIR}/cuda_probe/${tag}
              SOURCES ${CMAKE_CURRENT_SOURCE_DIR}/cmake/cuda_probe.cu
              CMAKE_FLAGS "-DINCLUDE_DIRECTORIES=${CMAKE_CURRENT_SOURCE_DIR}/csrc"
              CUDA_STANDARD 17
              OUTPUT_VARIABLE log)
  if(DEFINED log)
    file(WRITE ${CMAKE_CURRENT_BINARY_DIR}/cuda_probe/${tag}.log "${log}")
  endif()  # nvcc's own words, for a failure
  set(${out} ${FASTPPO_CUDA_PROBE_${tag}} PARENT_SCOPE)
endfunction()
