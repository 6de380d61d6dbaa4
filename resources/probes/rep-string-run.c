/* Minimal KVM runner for rep-string-guest.c: one slot over a NORESERVE mapping, long mode with 2 MiB identity pages; prints each marker byte the guest writes to port 0x3f8 with the vCPU thread CPU time (s) since the previous marker, i.e. the cost of the phase before it. See rep-string-probe.sh. */
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <stdint.h>
#include <unistd.h>
static double now(){struct timespec t;clock_gettime(CLOCK_THREAD_CPUTIME_ID,&t);return t.tv_sec+t.tv_nsec/1e9;}
int main(){ setvbuf(stdout,0,_IONBF,0);
 int kvm=open("/dev/kvm",O_RDWR); int vm=ioctl(kvm,KVM_CREATE_VM,0); ioctl(vm,KVM_SET_TSS_ADDR,0xfffbd000);
 size_t msz=0x4000000; uint8_t*mem=mmap(0,msz,PROT_READ|PROT_WRITE,MAP_PRIVATE|MAP_ANONYMOUS|MAP_NORESERVE,-1,0);
 int fd=open("g.bin",O_RDONLY); int fd_ok = fd >= 0 && read(fd,mem+0x1000,0x10000) > 0; if(!fd_ok){perror("g.bin");return 1;};
 struct kvm_userspace_memory_region r={.slot=0,.guest_phys_addr=0,.memory_size=msz,.userspace_addr=(uint64_t)mem};
 ioctl(vm,KVM_SET_USER_MEMORY_REGION,&r);
 int vcpu=ioctl(vm,KVM_CREATE_VCPU,0); int sz=ioctl(kvm,KVM_GET_VCPU_MMAP_SIZE,0);
 struct kvm_run*run=mmap(0,sz,PROT_READ|PROT_WRITE,MAP_SHARED,vcpu,0);
 struct kvm_sregs s; ioctl(vcpu,KVM_GET_SREGS,&s);
 uint64_t*pml4=(uint64_t*)(mem+0x9000),*pdpt=(uint64_t*)(mem+0xa000),*pd=(uint64_t*)(mem+0xb000);
 pml4[0]=0xa000|3; pdpt[0]=0xb000|3; for(int i=0;i<512;i++) pd[i]=((uint64_t)i<<21)|0x83;
 uint64_t*gdt=(uint64_t*)(mem+0x500); gdt[0]=0; gdt[1]=0x00af9b000000ffff; gdt[2]=0x00cf93000000ffff;
 s.gdt.base=0x500; s.gdt.limit=23;
 struct kvm_segment cs={.base=0,.limit=0xffffffff,.selector=8,.type=11,.present=1,.dpl=0,.db=0,.s=1,.l=1,.g=1};
 struct kvm_segment ds={.base=0,.limit=0xffffffff,.selector=16,.type=3,.present=1,.dpl=0,.db=1,.s=1,.l=0,.g=1};
 s.cs=cs; s.ds=s.es=s.fs=s.gs=s.ss=ds; s.cr3=0x9000; s.cr4=0x20; s.cr0=0x80050033; s.efer=0x500;
 ioctl(vcpu,KVM_SET_SREGS,&s);
 struct kvm_regs rg={0}; rg.rip=0x1000; rg.rflags=2; rg.rsp=0x8000; ioctl(vcpu,KVM_SET_REGS,&rg);
 double t0=now(); int exits=0;
 for(;;){ if(ioctl(vcpu,KVM_RUN,0)<0){perror("run");return 1;} exits++;
  if(run->exit_reason==KVM_EXIT_IO){ { char ch=*((char*)run+run->io.data_offset); static double last; double t=now(); printf("%c %.3f\n", ch, t-last); last=t; } continue;}
  if(run->exit_reason==KVM_EXIT_HLT) break;
  printf("exit %d\n",run->exit_reason); if(run->exit_reason==KVM_EXIT_INTERNAL_ERROR) printf("sub %d\n",run->internal.suberror); break; }
 printf("done in %.3f s, %d exits\n", now()-t0, exits);
 FILE*f=fopen("/proc/self/status","r"); char l[256]; while(fgets(l,256,f)) if(!strncmp(l,"VmRSS",5)) printf("%s",l);
 return 0;}
