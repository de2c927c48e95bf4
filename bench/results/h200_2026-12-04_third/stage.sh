#!/usr/bin/env bash
# call B1: stage the first half of the FA4 cu13 wheel and the small wheels on this machine for call B2.
mkdir -p /tmp/stage && cp .carry/c1/cu13.part_aa .carry/c1/*.whl /tmp/stage/ && ls /tmp/stage | wc -l && df -h /tmp | tail -1
